"""Every message that crosses a Ferry process boundary, with its encoding. No other logic.

A message is a multipart ZeroMQ frame list `[header, buffer0, buffer1, ...]`. The header is a
msgpack map `{"v": PROTOCOL_VERSION, "t": <type>, ...fields}`. Tensors never ride inside the
header: a header holds a `TensorRef` whose `loc` is either an inline frame index (the bytes are
frame `1 + index`, sent zero-copy) or a shared-memory reference `{region, offset, nbytes}` that the
reader bounds-checks against the region before touching a byte (see daemon/shm.py).

Decoding validates types and sizes of every field; a malformed message raises `BadMessage`
(an InvalidInput), a message of another protocol version raises `ProtocolMismatch`.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import msgpack
import numpy as np

from daemon.errors import InvalidInput, ProtocolMismatch

__all__ = [
    "PROTOCOL_VERSION", "DTYPES", "BadMessage", "ShmLoc", "TensorRef", "Message",
    "Infer", "InferResult", "Generate", "Tokens", "Progress", "Cancel", "Free", "ErrorReply",
    "RegisterRegion", "UnregisterRegion", "RegionReply", "Load", "Unload", "Loaded",
    "StatsQuery", "StatsReply", "Placement", "Control", "ControlReply", "EngineHello",
    "encode", "decode", "peek_id", "tensor_nbytes",
]

PROTOCOL_VERSION = 1

# dtypes allowed on the wire (numpy names). "bytes" is a BYTES tensor in Triton's serialized
# form (daemon/tensor_bytes.py): its byte size is the data's, not the shape's.
DTYPES = frozenset({
    "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
    "float16", "float32", "float64", "bytes",
})
MAX_RANK = 16
MAX_HEADER = 1 << 24
# No deadline is that far, and after a receiver's float arithmetic it is still an int64.
MAX_TIMEOUT_MS = 2**62
# Integer fields whose range a receiver relies on, beyond their type.
_INT_RANGES = {"timeout_ms": (0, MAX_TIMEOUT_MS)}
# Length bounds of string and list fields whose size a receiver relies on.
_MAX_LEN = {"trace": 256, "timing": 16}
# Optional tracing fields: left out of the header when empty, so an untraced message is byte for
# byte what it was before tracing existed (and costs nothing to send).
_OMIT_EMPTY = frozenset({"trace", "timing"})


class BadMessage(InvalidInput):
    code = "bad_message"


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise BadMessage(f"malformed message: {what}")


def _is_int(x: Any) -> bool:
    # bool is an int subclass; True must not pass for a frame index, offset or version
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(slots=True, frozen=True)
class ShmLoc:
    region: str
    offset: int
    nbytes: int


@dataclass(slots=True)
class TensorRef:
    name: str
    dtype: str
    shape: tuple[int, ...]
    frame: int | None = None        # inline: index into the buffers after the header
    shm: ShmLoc | None = None       # by reference into a shared-memory region

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

    def frame_index(self) -> int:
        """Index of the inline frame holding this tensor's bytes. A decoded ref is either
        inline or in shared memory, so this only fails for a ref that is neither."""
        if self.frame is None:
            raise BadMessage(f"malformed message: tensor {self.name!r} has no inline frame")
        return self.frame

    def to_wire(self) -> dict[str, Any]:
        loc: dict[str, Any] = ({"frame": self.frame} if self.shm is None else
                               {"region": self.shm.region, "offset": self.shm.offset,
                                "nbytes": self.shm.nbytes})
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "loc": loc}

    @classmethod
    def from_wire(cls, d: Any, n_frames: int) -> TensorRef:
        _need(isinstance(d, dict), "tensor must be a map")
        name, dtype, shape, loc = d.get("name"), d.get("dtype"), d.get("shape"), d.get("loc")
        _need(isinstance(name, str) and len(name) < 256, "tensor name")
        _need(isinstance(dtype, str) and dtype in DTYPES, f"tensor dtype {dtype!r:.60}")
        _need(isinstance(shape, list) and len(shape) <= MAX_RANK
              and all(_is_int(x) and 0 <= x < 2**40 for x in shape), "tensor shape")
        _need(isinstance(loc, dict), "tensor loc")
        ref = cls(name, dtype, tuple(shape))
        if "frame" in loc:
            idx = loc["frame"]
            _need(_is_int(idx) and 0 <= idx < n_frames, "tensor frame index")
            ref.frame = idx
        else:
            region, offset, nbytes = loc.get("region"), loc.get("offset"), loc.get("nbytes")
            _need(isinstance(region, str) and 0 < len(region) < 200, "shm region")
            _need(_is_int(offset) and offset >= 0, "shm offset")
            _need(_is_int(nbytes) and nbytes >= 0, "shm nbytes")
            _need(dtype == "bytes" or nbytes == ref.nbytes,
                  "shm nbytes does not match dtype and shape")
            ref.shm = ShmLoc(region, offset, nbytes)
        return ref


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = np.dtype(dtype).itemsize
    for d in shape:
        n *= d
    return n


# ---- messages -------------------------------------------------------------------------------

@dataclass(slots=True)
class Message:
    TYPE: ClassVar[str] = ""
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ()


@dataclass(slots=True)
class Infer(Message):
    """Frontend → engine: run a tensor model."""
    TYPE: ClassVar[str] = "infer"
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("inputs",)
    id: str
    model: str
    version: int
    inputs: list[TensorRef]
    outputs: list[str] | None = None
    timeout_ms: int = 0                  # 0: none; the engine turns it into a deadline
    out_shm: dict[str, ShmLoc] | None = None   # write these outputs into the caller's region
    request_id: str = ""                 # X-Request-ID, for logs
    frees: list[ShmLoc] = field(default_factory=list)   # engine blocks the sender is done with
    auth: str = ""                       # client → ZMQ frontend: API key or JWT; never forwarded
    progress: bool = False               # the engine may send `Progress` before the result
    # W3C traceparent "00-<trace id>-<parent span id>-<flags>" (see TRACING below); "": untraced
    trace: str = ""


# TRACING. A traced Infer or Generate carries `trace` (client → ZMQ frontend: the caller's
# context, ignored when malformed; frontend → engine: the dispatch span's). The engine then times
# the request and returns the times with its final reply in `timing`, CLOCK_MONOTONIC
# microseconds (host-wide, so the frontend places them on its own clock):
#   InferResult.timing = [received, batch started, ended]      (its batch: batch_size)
#   Tokens.timing      = [received, first scheduled, first token (0: none), ended,
#                         steps, prefill steps]                 (the finishing message only)
# Untraced messages carry neither field (frontends/spans.py turns them into spans).


@dataclass(slots=True)
class InferResult(Message):
    TYPE: ClassVar[str] = "result"
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("outputs",)
    id: str
    outputs: list[TensorRef]
    queue_us: int = 0
    compute_us: int = 0
    batch_size: int = 0
    timing: list[int] | None = None      # see TRACING


@dataclass(slots=True)
class Generate(Message):
    """Frontend → engine: generate tokens. The prompt ids travel as tensor `prompt` (int32)."""
    TYPE: ClassVar[str] = "generate"
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("prompt",)
    id: str
    model: str
    version: int
    prompt: list[TensorRef]
    params: dict[str, Any]
    request_id: str = ""
    frees: list[ShmLoc] = field(default_factory=list)
    auth: str = ""                       # client → ZMQ frontend: API key or JWT; never forwarded
    trace: str = ""                      # see TRACING


@dataclass(slots=True)
class Tokens(Message):
    """Engine → frontend: new tokens of one request from one engine step."""
    TYPE: ClassVar[str] = "tokens"
    id: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    # per token, the most likely alternatives as [token_id, logprob] pairs (top_logprobs > 0)
    top_logprobs: list[Any] | None = None
    timing: list[int] | None = None      # see TRACING


@dataclass(slots=True)
class Progress(Message):
    """Engine → frontend: one image of an Infer (with `progress` set) finished denoising step
    `step` of `steps` (the diffusion engine); the InferResult or ErrorReply still ends it."""
    TYPE: ClassVar[str] = "progress"
    id: str
    image: int
    step: int
    steps: int


@dataclass(slots=True)
class Cancel(Message):
    TYPE: ClassVar[str] = "cancel"
    id: str


@dataclass(slots=True)
class Free(Message):
    """Frontend → engine: engine-arena blocks the frontend has finished reading."""
    TYPE: ClassVar[str] = "free"
    frees: list[ShmLoc]


@dataclass(slots=True)
class ErrorReply(Message):
    TYPE: ClassVar[str] = "error"
    id: str
    status: int
    code: str
    message: str
    param: str | None = None
    retry_after: float | None = None     # seconds, for 429/503 answers a client may retry


@dataclass(slots=True)
class RegisterRegion(Message):
    """Map a client's (or frontend's) shared-memory segment in the receiver."""
    TYPE: ClassVar[str] = "register_region"
    id: str
    name: str                 # the region's public name in Ferry
    key: str                  # the POSIX shm name, e.g. "/ferry-client-1234"
    offset: int
    nbytes: int


@dataclass(slots=True)
class UnregisterRegion(Message):
    TYPE: ClassVar[str] = "unregister_region"
    id: str
    name: str


@dataclass(slots=True)
class RegionReply(Message):
    TYPE: ClassVar[str] = "region_ok"
    id: str
    regions: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class Load(Message):
    """Supervisor → engine: load a model version (spec read from its directory)."""
    TYPE: ClassVar[str] = "load"
    id: str
    name: str
    version: int
    path: str


@dataclass(slots=True)
class Unload(Message):
    TYPE: ClassVar[str] = "unload"
    id: str
    name: str
    version: int


@dataclass(slots=True)
class Loaded(Message):
    """Engine → supervisor: the reply to Load/Unload; `info` is ModelInfo as a map."""
    TYPE: ClassVar[str] = "loaded"
    id: str
    name: str
    version: int
    info: dict[str, Any] | None = None


@dataclass(slots=True)
class StatsQuery(Message):
    TYPE: ClassVar[str] = "stats"
    id: str


@dataclass(slots=True)
class StatsReply(Message):
    TYPE: ClassVar[str] = "stats_reply"
    id: str
    stats: dict[str, Any]


@dataclass(slots=True)
class SetLogLevel(Message):
    """Supervisor → engine: change the root log level at run time (Triton's logging extension);
    answered with a ControlReply."""
    TYPE: ClassVar[str] = "set_log_level"
    id: str
    level: str                       # debug | info | warning | error


@dataclass(slots=True)
class EngineHello(Message):
    """Engine → supervisor once its sockets are bound."""
    TYPE: ClassVar[str] = "hello"
    engine: str
    pid: int
    arena: str


@dataclass(slots=True)
class Placement(Message):
    """Supervisor → frontends (PUB): which engine serves which model version.

    engines: {engine_id: {"endpoint", "device", "generation", "alive", "pid"}}
    models:  {name: {"versions": {str(version): {"engines": [...], "info": {...}, "sha256"}},
              "latest": int}}
    """
    TYPE: ClassVar[str] = "placement"
    epoch: int
    engines: dict[str, Any]
    models: dict[str, Any]
    state: str = "starting"          # starting | opening | ready | degraded | draining
    config: dict[str, Any] = field(default_factory=dict)   # hot-reloadable frontend settings
    regions: list[dict[str, Any]] = field(default_factory=list)   # registered client regions


@dataclass(slots=True)
class Control(Message):
    """Frontend/CLI → supervisor: repository control (load, unload, index, reload)."""
    TYPE: ClassVar[str] = "control"
    id: str
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ControlReply(Message):
    TYPE: ClassVar[str] = "control_reply"
    id: str
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None


_REGISTRY: dict[str, type[Message]] = {cls.TYPE: cls for cls in (
    Infer, InferResult, Generate, Tokens, Progress, Cancel, Free, ErrorReply, RegisterRegion,
    UnregisterRegion, RegionReply, Load, Unload, Loaded, StatsQuery, StatsReply, EngineHello,
    Placement, Control, ControlReply, SetLogLevel)}


# ---- encode / decode ------------------------------------------------------------------------

_PLAIN, _TENSORS, _FREES, _OUT_SHM, _OPTIONAL = range(5)
_PLANS: dict[type[Message], tuple[tuple[str, int], ...]] = {}


def _plan(cls: type[Message]) -> tuple[tuple[str, int], ...]:
    """(field name, how it is written) per field, computed once per message type."""
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS[cls] = tuple(
            (f.name, _TENSORS if f.name in cls.TENSOR_FIELDS else _FREES if f.name == "frees"
             else _OUT_SHM if f.name == "out_shm" else _OPTIONAL if f.name in _OMIT_EMPTY
             else _PLAIN) for f in fields(cls))
    return plan


def encode(msg: Message, buffers: list[Any] | None = None) -> list[Any]:
    """Frames for `msg`: [header, *buffers]. Buffers are sent as given (zero-copy)."""
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": msg.TYPE}
    for name, how in _plan(type(msg)):
        value = getattr(msg, name)
        if how == _TENSORS:
            value = [t.to_wire() for t in value]
        elif how == _FREES:
            value = [[s.region, s.offset, s.nbytes] for s in value]
        elif how == _OUT_SHM and value is not None:
            value = {k: [s.region, s.offset, s.nbytes] for k, s in value.items()}
        elif how == _OPTIONAL and not value:
            continue
        header[name] = value
    return [msgpack.packb(header, use_bin_type=True), *(buffers or [])]


def _shm_list(raw: Any) -> list[ShmLoc]:
    _need(isinstance(raw, list) and len(raw) <= 4096, "frees")
    out = []
    for item in raw:
        _need(isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
              and all(_is_int(x) and x >= 0 for x in item[1:]), "shm location")
        out.append(ShmLoc(item[0], item[1], item[2]))
    return out


_SCALARS = {"str": str, "int": int, "bool": bool, "float": float}


def _check_field(name: str, annotation: str, value: Any) -> None:
    base = annotation.split(" | ")[0]
    optional = "None" in annotation
    if value is None:
        _need(optional, f"field {name!r} is required")
        return
    if base in _SCALARS:
        typ = _SCALARS[base]
        ok = isinstance(value, typ) and (typ is not int or not isinstance(value, bool))
        if typ is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _need(ok, f"field {name!r} must be {base}")
        if typ is str and name in _MAX_LEN:
            _need(len(value) <= _MAX_LEN[name], f"field {name!r} is too long")
        if name in _INT_RANGES:
            lo, hi = _INT_RANGES[name]
            _need(lo <= value <= hi, f"field {name!r} must lie in [{lo}, {hi}]")
    elif base.startswith("list[int]"):
        _need(isinstance(value, list) and all(isinstance(x, int) for x in value),
              f"field {name!r} must be a list of int")
        _need(len(value) <= _MAX_LEN.get(name, len(value)), f"field {name!r} is too long")
    elif base.startswith("list[float]"):
        _need(isinstance(value, list) and all(isinstance(x, (int, float)) for x in value),
              f"field {name!r} must be a list of float")
    elif base.startswith("list[str]"):
        _need(isinstance(value, list) and all(isinstance(x, str) for x in value),
              f"field {name!r} must be a list of str")
    elif base.startswith("dict"):
        _need(isinstance(value, dict), f"field {name!r} must be a map")
    elif base.startswith("list"):
        _need(isinstance(value, list), f"field {name!r} must be a list")


def decode(frames: list[Any]) -> tuple[Message, list[Any]]:
    """Parse `[header, *buffers]` into a message and its buffers (memoryviews or bytes)."""
    _need(len(frames) >= 1, "no header frame")
    _need(len(frames[0]) <= MAX_HEADER, "header too large")
    try:
        header = msgpack.unpackb(frames[0], raw=False, strict_map_key=True)
    except Exception as exc:   # msgpack raises many unrelated types on garbage
        raise BadMessage(f"malformed message: header is not msgpack ({type(exc).__name__})")
    _need(isinstance(header, dict), "header must be a map")
    version = header.get("v")
    if not _is_int(version) or version != PROTOCOL_VERSION:
        raise ProtocolMismatch(
            f"protocol version {version!r:.60} is not supported (this side speaks "
            f"{PROTOCOL_VERSION})")
    mtype = header.get("t")
    # an unhashable "t" (a list or map) must be a bad message, not a TypeError
    cls = _REGISTRY.get(mtype) if isinstance(mtype, str) else None
    if cls is None:
        raise BadMessage(f"malformed message: unknown message type {mtype!r:.60}")
    buffers = list(frames[1:])
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in header:
            _need(f.default is not MISSING or f.default_factory is not MISSING,
                  f"field {f.name!r} is required")
            continue
        value = header[f.name]
        if f.name in cls.TENSOR_FIELDS:
            _need(isinstance(value, list) and len(value) <= 1024, f"{f.name} must be a list")
            value = [TensorRef.from_wire(t, len(buffers)) for t in value]
        elif f.name == "frees":
            value = _shm_list(value)
        elif f.name == "out_shm":
            if value is not None:
                _need(isinstance(value, dict), "out_shm must be a map")
                value = {k: _shm_list([v])[0] for k, v in value.items()}
        else:
            _check_field(f.name, str(f.type), value)
        kwargs[f.name] = value
    try:
        return cls(**kwargs), buffers
    except TypeError as exc:
        raise BadMessage(f"malformed message: {exc}") from None


def peek_id(frames: list[Any]) -> str:
    """Best effort: the `id` of a message that failed to decode, so its error reply still
    reaches the request waiting for it instead of leaving it to time out."""
    try:
        header = msgpack.unpackb(frames[0], raw=False, strict_map_key=True)
    except Exception:   # garbage: there is no id to find
        return ""
    rid = header.get("id") if isinstance(header, dict) else None
    return rid if isinstance(rid, str) and len(rid) <= 256 else ""
