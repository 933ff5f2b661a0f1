"""KServe v2 / Triton HTTP tensor encoding: JSON tensors and the binary-data extension.

Request body: JSON, optionally followed by raw tensor bytes when the header
`Inference-Header-Content-Length` gives the JSON part's length. Inputs carry `data` (JSON, row
major), `parameters.binary_data_size` (bytes taken in order from the binary part) or
`parameters.shared_memory_region` (+ `shared_memory_byte_size`, `shared_memory_offset`).
BYTES tensors are JSON strings in `data`, and in binary data or shared memory Triton's serialized
form (daemon/tensor_bytes.py). A header length of 0 is Triton's raw binary request: no JSON at
all, the body is the model's single input (`parse_raw`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon import protocol as P
from daemon.errors import InvalidInput
from daemon.tensor_bytes import BYTES, from_buffer, wire_dtype
from frontends.http.json_body import decode_json

__all__ = ["KSERVE_TO_NUMPY", "NUMPY_TO_KSERVE", "ParsedInfer", "parse_infer", "parse_raw",
           "encode_outputs"]

KSERVE_TO_NUMPY = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
    "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BYTES": BYTES,
}
NUMPY_TO_KSERVE = {v: k for k, v in KSERVE_TO_NUMPY.items()}
MAX_ELEMENTS = 1 << 31
MAX_TENSORS = 1024            # daemon/protocol.py's bound on a message's tensor list


@dataclass(slots=True)
class OutputRequest:
    name: str
    binary: bool
    shm: P.ShmLoc | None = None
    classification: int = 0         # top-k classes instead of the scores (0: the scores)


@dataclass(slots=True)
class ParsedInfer:
    id: str | None
    arrays: dict[str, np.ndarray]
    region_refs: list[P.TensorRef]
    outputs: list[OutputRequest] | None
    binary_default: bool
    timeout_ms: int = 0
    parameters: dict[str, Any] = field(default_factory=dict)


def _bad(msg: str, code: str = "invalid_input", param: str | None = None) -> InvalidInput:
    return InvalidInput(msg, code=code, param=param)


def _tensor_name(name: Any) -> bool:
    """Within daemon/protocol.py's bounds: an engine cannot answer a message outside them."""
    return isinstance(name, str) and 0 < len(name) < 256


def _shape(name: str, raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) > P.MAX_RANK or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise _bad(f"input {name!r}: shape must be a list of non-negative integers",
                   "invalid_shape", name)
    count = 1
    for d in raw:
        # Zeros skipped: [0, 2**70] holds no element, yet numpy cannot index it (a 500).
        count *= max(d, 1)
    if count > MAX_ELEMENTS:
        raise _bad(f"input {name!r}: shape {raw} is too large", "invalid_shape", name)
    return tuple(raw)


def _json_strings(name: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    """BYTES from JSON: strings, nested like the shape or flat, as UTF-8 bytes."""
    flat: list[bytes] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            flat.append(item.encode("utf-8", "surrogatepass"))
        else:
            raise _bad(f"input {name!r}: BYTES data must be strings, got "
                       f"{type(item).__name__}", "invalid_data", name)
    need = int(np.prod(shape, dtype=np.int64))
    if len(flat) != need:
        raise _bad(f"input {name!r}: {len(flat)} values given, shape {list(shape)} needs {need}",
                   "invalid_shape", name)
    out = np.empty(need, dtype=object)
    out[:] = flat
    return out.reshape(shape)


def _json_data(name: str, dtype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    if dtype == BYTES:
        return _json_strings(name, shape, data)
    try:
        arr = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise _bad(f"input {name!r}: data does not match datatype {NUMPY_TO_KSERVE[dtype]}",
                   "invalid_data", name) from None
    if arr.dtype == object or arr.size != int(np.prod(shape, dtype=np.int64)):
        raise _bad(f"input {name!r}: {arr.size} values given, shape {list(shape)} needs "
                   f"{int(np.prod(shape, dtype=np.int64))}", "invalid_shape", name)
    return arr.reshape(shape)


def _params(obj: dict, where: str) -> dict:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise _bad(f"{where}: parameters must be an object")
    return params


def _shm_loc(name: str, params: dict, nbytes_needed: int | None) -> P.ShmLoc:
    region = params.get("shared_memory_region")
    size = params.get("shared_memory_byte_size")
    offset = params.get("shared_memory_offset", 0)
    # The bounds are the wire protocol's (daemon/protocol.py): an engine cannot even tell
    # which request a reference outside them belongs to, so it could never answer it.
    if not isinstance(region, str) or not 0 < len(region) < 200 or not isinstance(size, int) \
            or not isinstance(offset, int) or not 0 <= size < 2**63 or not 0 <= offset < 2**63:
        raise _bad(f"{name!r}: shared_memory_region, shared_memory_byte_size and "
                   f"shared_memory_offset must be a name of 1-199 characters and integers in "
                   f"[0, 2**63)", "shm_bad_reference", name)
    if nbytes_needed is not None and size != nbytes_needed:
        raise _bad(f"input {name!r}: shared_memory_byte_size {size} does not match the "
                   f"{nbytes_needed} bytes of its datatype and shape", "shm_bad_reference", name)
    return P.ShmLoc(region, offset, size)


def parse_infer(body: bytes, header_length: str | None) -> ParsedInfer:
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise _bad("Inference-Header-Content-Length must be an integer",
                       "invalid_header") from None
        if n < 0 or n > len(body):
            raise _bad(f"Inference-Header-Content-Length {n} exceeds the body of {len(body)} "
                       "bytes", "truncated_body")
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    req = decode_json(head)      # deep nesting and lone surrogates are 400s too
    if not isinstance(req, dict):
        raise _bad("request body must be a JSON object", "invalid_json")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not 0 < len(inputs) <= MAX_TENSORS:
        raise _bad(f"'inputs' must be a list of 1 to {MAX_TENSORS} inputs", param="inputs")
    rparams = _params(req, "request")
    sequence = sorted(k for k in ("sequence_id", "sequence_start", "sequence_end") if k in rparams)
    if sequence:
        # Ignoring them would run a stateful model as if stateless: say so instead
        raise _bad(f"parameters {sequence}: sequence batching (stateful models) is not "
                   "supported by this server", "sequence_unsupported", sequence[0])
    arrays: dict[str, np.ndarray] = {}
    region_refs: list[P.TensorRef] = []
    pos = 0
    for item in inputs:
        if not isinstance(item, dict) or not _tensor_name(item.get("name")):
            raise _bad("every input needs a 'name' of 1-255 characters", param="inputs")
        name = item["name"]
        if name in arrays or any(r.name == name for r in region_refs):
            raise _bad(f"input {name!r} given twice", param=name)
        datatype = item.get("datatype")
        dtype = KSERVE_TO_NUMPY.get(datatype) if isinstance(datatype, str) else None
        if dtype is None:
            raise _bad(f"input {name!r}: unknown datatype {datatype!r}", "invalid_dtype", name)
        shape = _shape(name, item.get("shape"))
        params = _params(item, f"input {name!r}")
        # BYTES: the size is the data's (each element's length prefix and bytes)
        nbytes = None if dtype == BYTES else P.tensor_nbytes(dtype, shape)
        if "shared_memory_region" in params:
            loc = _shm_loc(name, params, nbytes)
            region_refs.append(P.TensorRef(name, dtype, shape, shm=loc))
        elif "binary_data_size" in params:
            size = params["binary_data_size"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or (
                    nbytes is not None and size != nbytes):
                raise _bad(f"input {name!r}: binary_data_size {size!r} does not match the "
                           f"{nbytes} bytes of its datatype and shape", "invalid_shape", name)
            if pos + size > len(binary):
                raise _bad(f"input {name!r}: the binary body ends before its {size} bytes",
                           "truncated_body", name)
            chunk = binary[pos:pos + size]
            arrays[name] = from_buffer(name, dtype, shape, chunk)
            pos += size
        elif "data" in item:
            arrays[name] = _json_data(name, dtype, shape, item["data"])
        else:
            raise _bad(f"input {name!r} has no data, binary_data_size or shared memory",
                       param=name)
    if pos != len(binary):
        raise _bad(f"{len(binary) - pos} bytes of binary data are not claimed by any input",
                   "invalid_body")
    binary_default = rparams.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise _bad("binary_data_output must be a boolean", param="binary_data_output")
    outputs = _parse_outputs(req.get("outputs"), binary_default)
    timeout = rparams.get("timeout", 0)
    if not isinstance(timeout, int) or timeout < 0:
        raise _bad("parameters.timeout must be a non-negative integer (microseconds)",
                   param="timeout")
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise _bad("'id' must be a string", param="id")
    return ParsedInfer(rid, arrays, region_refs, outputs, binary_default,
                       timeout // 1000, rparams)


def _parse_outputs(raw: Any, binary_default: bool) -> list[OutputRequest] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise _bad(f"'outputs' must be a list of at most {MAX_TENSORS}", param="outputs")
    out: list[OutputRequest] = []
    for item in raw:
        if not isinstance(item, dict) or not _tensor_name(item.get("name")):
            raise _bad("every requested output needs a 'name' of 1-255 characters",
                       param="outputs")
        name = item["name"]
        if any(o.name == name for o in out):
            raise _bad(f"output {name!r} is requested twice", "duplicate_output", name)
        params = _params(item, f"output {name!r}")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise _bad("binary_data must be a boolean", param=name)
        shm = _shm_loc(name, params, None) if "shared_memory_region" in params else None
        k = params.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < 2**31:
            raise _bad(f"output {name!r}: classification must be a class count >= 0",
                       "invalid_classification", name)
        if k and shm is not None:
            raise _bad(f"output {name!r}: classification results are strings and cannot be "
                       "written to a shared-memory region", "invalid_classification", name)
        out.append(OutputRequest(name, binary, shm, k))
    return out


def encode_outputs(arrays: dict[str, np.ndarray], parsed: ParsedInfer,
                   out_shm: dict[str, P.ShmLoc]) -> tuple[list[dict], list[bytes | memoryview]]:
    """JSON output entries and the binary chunks that follow the JSON (in the same order)."""
    wanted = {o.name: o for o in parsed.outputs} if parsed.outputs else None
    entries: list[dict] = []
    chunks: list[bytes | memoryview] = []
    for name, arr in arrays.items():
        if wanted is not None and name not in wanted:
            continue
        strings = arr.dtype == object          # BYTES: string models, classification results
        entry: dict[str, Any] = {"name": name, "shape": list(arr.shape),
                                 "datatype": NUMPY_TO_KSERVE[wire_dtype(arr)]}
        if name in out_shm:
            loc = out_shm[name]
            entry["parameters"] = {"shared_memory_region": loc.region,
                                   "shared_memory_byte_size": loc.nbytes}
        elif strings:
            items = [bytes(b) for b in arr.reshape(-1)]
            if wanted[name].binary if wanted is not None else parsed.binary_default:
                # the binary-data form of BYTES: each element after its 4-byte LE length
                packed = b"".join(len(b).to_bytes(4, "little") + b for b in items)
                entry["parameters"] = {"binary_data_size": len(packed)}
                chunks.append(packed)
            else:
                entry["data"] = [_text(name, b) for b in items]
        elif (wanted[name].binary if wanted is not None else parsed.binary_default):
            data = np.ascontiguousarray(arr)
            entry["parameters"] = {"binary_data_size": data.nbytes}
            chunks.append(data.tobytes())
        else:
            entry["data"] = arr.reshape(-1).tolist()
        entries.append(entry)
    return entries, chunks


def _text(name: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(f"output {name!r} holds bytes that are not UTF-8 and cannot be a JSON "
                   "string; request it with binary_data", "output_not_utf8", name) from None


def parse_raw(body: bytes, inputs: list[dict[str, Any]], max_batch_size: int) -> ParsedInfer:
    """Triton's raw binary request (Inference-Header-Content-Length: 0): the whole body is the
    model's single input. A BYTES input takes the body as its one element (shape [1], [1, 1]
    with a batch dim); another dtype needs static dims (but the batch dim, 1) that the body's
    size fills exactly. Every output comes back in binary form."""
    if len(inputs) != 1:
        raise _bad(f"a raw binary request (Inference-Header-Content-Length: 0) needs a model "
                   f"with exactly one input; this one has {len(inputs)}", "raw_request_unsupported")
    spec = inputs[0]
    name, dtype = spec["name"], spec["dtype"]
    dims = list(spec["shape"])
    if max_batch_size > 0 and dims and dims[0] == -1:
        dims[0] = 1
    if dtype == BYTES:
        arr = np.empty(1, dtype=object)
        arr[0] = bytes(body)
        shape = tuple(1 for _ in dims) or (1,)
        return ParsedInfer(None, {name: arr.reshape(shape)}, [], None, True)
    if any(d < 0 for d in dims):
        raise _bad(f"a raw binary request cannot give input {name!r} a shape: the model "
                   f"declares {spec['shape']}, with dynamic dims; send a JSON header",
                   "raw_request_unsupported", name)
    need = P.tensor_nbytes(dtype, tuple(dims))
    if len(body) != need:
        raise _bad(f"raw binary input {name!r}: the body has {len(body)} bytes, "
                   f"{NUMPY_TO_KSERVE[dtype]} {dims} needs {need}", "invalid_shape", name)
    arr = from_buffer(name, dtype, tuple(dims), body)
    return ParsedInfer(None, {name: arr}, [], None, True)
