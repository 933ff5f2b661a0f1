"""Wire protocol: every message round-trips; every malformed header is a BadMessage, a foreign
version a ProtocolMismatch, and nothing else ever escapes decode()."""
from __future__ import annotations

from typing import Any, Callable

import msgpack
import numpy as np
import pytest

from daemon import protocol as P
from daemon.errors import InvalidInput, ProtocolMismatch

pytestmark = pytest.mark.timeout(30)


def _inline(name: str = "x", dtype: str = "float32", shape: tuple[int, ...] = (2, 3),
            frame: int = 0) -> P.TensorRef:
    return P.TensorRef(name, dtype, shape, frame=frame)


def _by_shm(name: str = "x", dtype: str = "float32", shape: tuple[int, ...] = (2, 3),
            offset: int = 128) -> P.TensorRef:
    return P.TensorRef(name, dtype, shape,
                       shm=P.ShmLoc("ferry-abc-eng-42", offset, P.tensor_nbytes(dtype, shape)))


# One instance per message type, with every optional field set to a non-default value.
SAMPLES: dict[str, Callable[[Callable[..., P.TensorRef]], P.Message]] = {
    "infer": lambda t: P.Infer(
        "req-1", "digits", 3, [t("a"), t("b", "int64", (4,), **({"frame": 1} if t is _inline
                                                              else {"offset": 0}))],
        outputs=["probs", "label"], timeout_ms=250,
        out_shm={"probs": P.ShmLoc("client-r", 64, 40)}, request_id="rid-9",
        frees=[P.ShmLoc("ferry-abc-http0-7", 0, 64), P.ShmLoc("ferry-abc-http0-7", 128, 8)]),
    "result": lambda t: P.InferResult("req-1", [t("probs")], queue_us=12, compute_us=340,
                                      batch_size=4),
    "generate": lambda t: P.Generate(
        "g-1", "smollm2", 1, [t("prompt", "int32", (7,))],
        {"max_tokens": 16, "temperature": 0.5, "stop": ["\n"], "seed": None}, request_id="r",
        frees=[P.ShmLoc("ferry-abc-zmq-1", 64, 64)]),
    "tokens": lambda t: P.Tokens("g-1", [5, 6, 7], logprobs=[-0.5, -1.25, -3.0], finished=True,
                                 finish_reason="stop", prompt_tokens=7, cached_tokens=4),
    "progress": lambda t: P.Progress("req-1", image=1, step=3, steps=20),
    "cancel": lambda t: P.Cancel("g-1"),
    "free": lambda t: P.Free([P.ShmLoc("ferry-abc-eng-3", 0, 4096)]),
    "error": lambda t: P.ErrorReply("req-1", 503, "busy", "queue is full", param="model"),
    "register_region": lambda t: P.RegisterRegion("c1", "in0", "/client-seg", 64, 1 << 20),
    "unregister_region": lambda t: P.UnregisterRegion("c2", "in0"),
    "region_ok": lambda t: P.RegionReply("c1", [{"name": "in0", "byte_size": 1024}]),
    "load": lambda t: P.Load("l1", "digits", 2, "/models/digits/2"),
    "unload": lambda t: P.Unload("u1", "digits", 2),
    "loaded": lambda t: P.Loaded("l1", "digits", 2, info={"inputs": [{"name": "pixels"}]}),
    "stats": lambda t: P.StatsQuery("s1"),
    "set_log_level": lambda t: P.SetLogLevel("l1", "debug"),
    "stats_reply": lambda t: P.StatsReply("s1", {"requests": 10, "models": {"a": 1.5}}),
    "hello": lambda t: P.EngineHello("cpu-0", 4242, "ferry-abc-eng-4242"),
    "placement": lambda t: P.Placement(
        7, {"cpu-0": {"endpoint": "ipc:///tmp/e", "alive": True, "pid": 12}},
        {"digits": {"versions": {"1": {"engines": ["cpu-0"]}}, "latest": 1}},
        state="ready", config={"log_bodies": False}, regions=[{"name": "in0"}]),
    "control": lambda t: P.Control("k1", "load", {"model": "digits"}),
    "control_reply": lambda t: P.ControlReply("k1", False, {"x": 1},
                                              error={"code": "model_not_found"}),
}


def test_every_registered_message_has_a_sample():
    assert set(SAMPLES) == set(P._REGISTRY)


def _frames_for(msg: P.Message) -> list[Any]:
    n = sum(1 for f in msg.TENSOR_FIELDS for ref in getattr(msg, f) if ref.frame is not None)
    return [np.arange(6, dtype=np.float32).tobytes() * (i + 1) for i in range(n)]


@pytest.mark.parametrize("tensor", [_inline, _by_shm], ids=["inline", "shm"])
@pytest.mark.parametrize("mtype", sorted(P._REGISTRY))
def test_round_trip(mtype, tensor):
    msg = SAMPLES[mtype](tensor)
    assert type(msg) is P._REGISTRY[mtype]
    buffers = _frames_for(msg)
    frames = P.encode(msg, buffers)
    assert isinstance(frames[0], bytes) and frames[1:] == buffers
    back, bufs = P.decode(frames)
    assert type(back) is type(msg)
    assert back == msg
    assert all(a is b for a, b in zip(bufs, buffers))   # buffers pass through untouched


def test_defaults_round_trip_when_optional_fields_are_absent():
    header = {"v": P.PROTOCOL_VERSION, "t": "infer", "id": "r", "model": "m", "version": 1,
              "inputs": []}
    msg, bufs = P.decode([msgpack.packb(header)])
    assert msg == P.Infer("r", "m", 1, [])
    assert (msg.outputs, msg.timeout_ms, msg.out_shm, msg.frees, bufs) == (None, 0, None, [], [])


def test_tensor_refs_decode_to_tuples_and_their_byte_size():
    msg, _ = P.decode(P.encode(P.InferResult("r", [_by_shm("y", "float16", (3, 5))])))
    ref = msg.outputs[0]
    assert ref.shape == (3, 5) and ref.frame is None
    assert ref.nbytes == 30 == P.tensor_nbytes("float16", (3, 5))
    assert ref.shm == P.ShmLoc("ferry-abc-eng-42", 128, 30)


def test_unknown_header_keys_are_ignored():
    header = _header(P.Cancel("c"))
    header["added_in_a_later_minor"] = [1, 2]
    assert P.decode([msgpack.packb(header)])[0] == P.Cancel("c")


# ---- refusals ---------------------------------------------------------------------------------

def _header(msg: P.Message) -> dict[str, Any]:
    return msgpack.unpackb(P.encode(msg)[0])


@pytest.mark.parametrize("version", [2, 0, -1, None, "1", 1.5, True, [1]])
def test_other_protocol_version_is_a_mismatch(version):
    header = _header(P.Cancel("c"))
    if version is None:
        del header["v"]
    else:
        header["v"] = version
    with pytest.raises(ProtocolMismatch) as err:
        P.decode([msgpack.packb(header)])
    assert err.value.code == "protocol_version" and err.value.status == 400


def _infer_header(**tensor: Any) -> dict[str, Any]:
    """An Infer header with one inline tensor whose wire fields are overridden by `tensor`."""
    header = _header(P.Infer("r", "m", 1, [_inline()]))
    header["inputs"][0].update(tensor)
    return header


def _shm_header(**loc: Any) -> dict[str, Any]:
    header = _header(P.Infer("r", "m", 1, [_by_shm()]))
    header["inputs"][0]["loc"].update(loc)
    return header


def _set(msg: P.Message, **fields: Any) -> dict[str, Any]:
    header = _header(msg)
    for k, v in fields.items():
        if v is _DELETE:
            del header[k]
        else:
            header[k] = v
    return header


_DELETE = object()
_INFER = P.Infer("r", "m", 1, [])
_TOKENS = P.Tokens("g", [1])

BAD_HEADERS: dict[str, Any] = {
    # type
    "unknown type": _set(P.Cancel("c"), t="nope"),
    "no type": _set(P.Cancel("c"), t=_DELETE),
    "list type": _set(P.Cancel("c"), t=["infer"]),
    "map type": _set(P.Cancel("c"), t={"a": 1}),
    "int type": _set(P.Cancel("c"), t=3),
    # required fields
    "infer without model": _set(_INFER, model=_DELETE),
    "infer without inputs": _set(_INFER, inputs=_DELETE),
    "cancel without id": _set(P.Cancel("c"), id=_DELETE),
    "required field null": _set(_INFER, model=None),
    "hello without pid": _set(P.EngineHello("e", 1, "a"), pid=_DELETE),
    # field types
    "version str": _set(_INFER, version="1"),
    "version bool": _set(_INFER, version=True),
    "version float": _set(_INFER, version=1.0),
    "id int": _set(_INFER, id=5),
    "id bytes": _set(_INFER, id=b"r"),
    "outputs str": _set(_INFER, outputs="probs"),
    "outputs of int": _set(_INFER, outputs=[1]),
    "timeout float": _set(_INFER, timeout_ms=1.5),
    "inputs map": _set(_INFER, inputs={"x": 1}),
    "inputs too many": _set(_INFER, inputs=[{}] * 1025),
    "token ids str": _set(_TOKENS, token_ids="abc"),
    "token ids of str": _set(_TOKENS, token_ids=["a"]),
    "logprobs of str": _set(_TOKENS, logprobs=["x"]),
    "finished str": _set(_TOKENS, finished="yes"),
    "finished int": _set(_TOKENS, finished=1),
    "finish reason int": _set(_TOKENS, finish_reason=1),
    "generate params list": _set(P.Generate("g", "m", 1, [], {}), params=[1]),
    "placement engines list": _set(P.Placement(1, {}, {}), engines=[]),
    "placement regions map": _set(P.Placement(1, {}, {}), regions={}),
    "error status str": _set(P.ErrorReply("r", 400, "c", "m"), status="400"),
    "control ok int": _set(P.ControlReply("k", True), ok=1),
    # frees and out_shm
    "frees str": _set(_INFER, frees="x"),
    "frees short item": _set(_INFER, frees=[["r", 1]]),
    "frees negative": _set(_INFER, frees=[["r", -1, 3]]),
    "frees region int": _set(_INFER, frees=[[1, 2, 3]]),
    "frees bool offset": _set(_INFER, frees=[["r", True, 3]]),
    "free message bad": _set(P.Free([]), frees=[["r", 0, "64"]]),
    "out_shm list": _set(_INFER, out_shm=[["r", 0, 4]]),
    "out_shm bad loc": _set(_INFER, out_shm={"y": ["r", 0]}),
    # tensors
    "tensor not map": _set(_INFER, inputs=[["x", "float32"]]),
    "tensor name int": _infer_header(name=3),
    "tensor name long": _infer_header(name="n" * 256),
    "dtype object": _infer_header(dtype="object"),
    "dtype str": _infer_header(dtype="<U3"),
    "dtype unhashable": _infer_header(dtype=["float32"]),
    "dtype missing": _infer_header(dtype=None),
    "shape negative": _infer_header(shape=[2, -1]),
    "shape huge dim": _infer_header(shape=[2 ** 40]),
    "shape rank 17": _infer_header(shape=[1] * 17),
    "shape bool": _infer_header(shape=[True, 3]),
    "shape float": _infer_header(shape=[2.0, 3]),
    "shape str": _infer_header(shape="2,3"),
    "loc missing": _infer_header(loc=None),
    "loc list": _infer_header(loc=[0]),
    "frame out of range": _infer_header(loc={"frame": 1}),
    "frame negative": _infer_header(loc={"frame": -1}),
    "frame str": _infer_header(loc={"frame": "0"}),
    "frame bool": _infer_header(loc={"frame": True}),
    "shm nbytes mismatch": _shm_header(nbytes=23),
    "shm nbytes bool": _shm_header(nbytes=True),
    "shm nbytes missing": _shm_header(nbytes=None),
    "shm offset negative": _shm_header(offset=-64),
    "shm offset str": _shm_header(offset="0"),
    "shm region empty": _shm_header(region=""),
    "shm region long": _shm_header(region="r" * 200),
    "shm region int": _shm_header(region=7),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_malformed_header_is_a_bad_message(case):
    # one 24-byte buffer: frame 0 exists, frame 1 does not
    frames = [msgpack.packb(BAD_HEADERS[case], use_bin_type=True), b"\0" * 24]
    with pytest.raises(P.BadMessage) as err:
        P.decode(frames)
    assert isinstance(err.value, InvalidInput)
    assert err.value.code == "bad_message" and err.value.status == 400


def test_frame_index_is_checked_against_the_frames_actually_sent():
    header = msgpack.packb(_infer_header(loc={"frame": 1}))
    assert P.decode([header, b"a" * 24, b"b" * 24])[0].inputs[0].frame == 1
    with pytest.raises(P.BadMessage):
        P.decode([header, b"a" * 24])


NOT_MSGPACK = {
    "empty": b"",
    "reserved byte": b"\xc1",
    "truncated map": b"\x82\xa1v\x01",
    "trailing bytes": msgpack.packb({"v": 1, "t": "cancel", "id": "c"}) + b"\x00",
    "int keys": msgpack.packb({1: 2}),
    "list": msgpack.packb([1, "cancel"]),
    "int": msgpack.packb(7),
    "nil": msgpack.packb(None),
    "text": b"hello world",
}


@pytest.mark.parametrize("case", sorted(NOT_MSGPACK))
def test_header_that_is_not_a_msgpack_map_is_a_bad_message(case):
    with pytest.raises(P.BadMessage) as err:
        P.decode([NOT_MSGPACK[case]])
    assert err.value.code == "bad_message"


def test_oversize_header_is_refused_before_parsing():
    big = msgpack.packb({"v": 1, "t": "cancel", "id": "c", "pad": "x" * P.MAX_HEADER})
    assert len(big) > P.MAX_HEADER
    with pytest.raises(P.BadMessage) as err:
        P.decode([big])
    assert "too large" in err.value.message


def test_no_frames_is_a_bad_message():
    with pytest.raises(P.BadMessage):
        P.decode([])


def test_long_values_are_cut_in_error_messages():
    with pytest.raises(P.BadMessage) as err:
        P.decode([msgpack.packb(_set(P.Cancel("c"), t="t" * 100_000))])
    assert len(err.value.message) < 200


def test_peek_id_finds_the_id_of_a_message_that_does_not_decode():
    import msgpack
    bad = msgpack.packb({"v": 1, "t": "infer", "id": "req-7", "inputs": "not a list"})
    with pytest.raises(P.BadMessage):
        P.decode([bad])
    assert P.peek_id([bad]) == "req-7"
    assert P.peek_id([b"\xc1 garbage"]) == ""
    assert P.peek_id([msgpack.packb({"id": 5})]) == ""
