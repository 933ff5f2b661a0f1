"""The tensor codec: a tensor's bytes on the wire and in shared memory, for every dtype Ferry
carries, and the one place a numpy array becomes what travels (`encode`) and a protocol
`TensorRef` with its frame or region becomes an array again (`decode`). Frontends, engines and
the Python client all pack and unpack through it, so every side refuses the same bad forms with
the same codes: a dtype the wire does not carry (`invalid_dtype`), a shape with negative or too
many dims or bytes that do not fill it exactly (`invalid_shape`), malformed BYTES data
(`invalid_data`).

Fixed-size dtypes travel as their raw memory. BYTES tensors (numpy object arrays of `bytes`,
the dtype name "bytes" in model.toml, protocol refs and TensorSpecs) travel in Triton's
serialized form: each element as a 4-byte little-endian length and then its bytes, row major.
That is also the form a client writes into a shared-memory region and the binary-data extension
carries, so a BYTES tensor is serialized once, by whoever made it, and parsed once, by whoever
reads it.
"""
from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from daemon import protocol as P
from daemon.errors import InvalidInput

if TYPE_CHECKING:
    from daemon.shm import RegionMap

__all__ = ["BYTES", "wire_dtype", "check_dtype", "encode", "decode", "frame_data", "to_buffer",
           "from_buffer", "serialize", "deserialize", "element_bytes"]

BYTES = "bytes"
_LEN = struct.Struct("<I")


def wire_dtype(arr: np.ndarray) -> str:
    """The dtype name a tensor travels under: "bytes" for object arrays, else numpy's name."""
    dtype = arr.dtype
    return BYTES if dtype.kind == "O" else _WIRE_NAME.get(dtype.type) or dtype.name


def element_bytes(value: Any) -> bytes:
    """One BYTES element: bytes as they are, str as UTF-8 (numpy's str_ and bytes_ too)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    raise InvalidInput(f"a BYTES element must be bytes or a string, got {type(value).__name__}",
                       code="invalid_data")


def serialize(arr: np.ndarray) -> np.ndarray:
    """Triton's serialized form of a BYTES tensor, as a uint8 array. # [sum(4 + len)]"""
    parts = []
    for value in arr.reshape(-1):
        data = element_bytes(value)
        parts.append(_LEN.pack(len(data)))
        parts.append(data)
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def deserialize(data: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    """The object array of `bytes` that `data` (Triton's serialized form) holds; every byte
    must belong to exactly prod(shape) elements."""
    buf = memoryview(data).cast("B")
    count = math.prod(shape)
    if count * 4 > len(buf):      # every element has its 4-byte length: refuse before allocating
        raise _short(name, count, len(buf) // 4)
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(buf):
            raise _short(name, count, i)
        (size,) = _LEN.unpack_from(buf, pos)
        pos += 4
        if pos + size > len(buf):
            raise _short(name, count, i)
        out[i] = bytes(buf[pos:pos + size])
        pos += size
    if pos != len(buf):
        raise InvalidInput(f"tensor {name!r}: {len(buf) - pos} bytes follow its {count} BYTES "
                           "elements", code="invalid_data", param=name)
    return out.reshape(shape)


def _short(name: str, count: int, index: int) -> InvalidInput:
    return InvalidInput(f"tensor {name!r}: the data ends inside BYTES element {index} of "
                        f"{count} (each is a 4-byte little-endian length, then its bytes)",
                        code="invalid_data", param=name)


def to_buffer(arr: np.ndarray) -> np.ndarray:
    """What travels for `arr`: its serialized form for BYTES, else C-ordered native memory."""
    if arr.dtype == object:
        return serialize(arr)
    # the wire names dtypes without byte order: big-endian data must be swapped, not
    # relabelled; asarray (not ascontiguousarray) keeps a 0-d tensor 0-d
    return np.asarray(arr, dtype=arr.dtype.newbyteorder("="), order="C")


def from_buffer(name: str, dtype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    """The array `data` holds (a view for fixed-size dtypes, parsed for BYTES), after checking
    the dtype is one the wire carries, the shape is well formed and the bytes fill it exactly."""
    need = _checked_nbytes(name, dtype, shape)
    if dtype == BYTES:
        return deserialize(data, shape, name)
    size = memoryview(data).nbytes
    if size != need:
        raise InvalidInput(f"tensor {name!r}: frame holds {size} bytes, dtype and shape need "
                           f"{need}", code="invalid_shape", param=name)
    return np.frombuffer(data, dtype=dtype).reshape(shape)


# An element's size in memory (a BYTES element is an object pointer) for each wire dtype.
_ITEMSIZE = {d: np.dtype(object if d == BYTES else d).itemsize for d in P.DTYPES}
# The wire name of each fixed-size numpy scalar type, whatever its byte order, filled as met
# (numpy computes `dtype.name` in Python, slower than the rest of an encode together).
_WIRE_NAME: dict[type, str] = {np.dtype(d).type: d for d in P.DTYPES if d != BYTES}
# numpy refuses an array whose dims (the non-zero ones, even when another is 0) times its
# itemsize pass this, with a ValueError: refuse it first, as the client's error
_MAX_ARRAY_BYTES = 2**63 - 1


def _checked_nbytes(name: str, dtype: str, shape: tuple[int, ...]) -> int:
    """itemsize * prod(shape), exact (Python ints: an int64 product can wrap), after checking
    the dtype travels and the shape is one numpy can make. On the hot path: no numpy calls."""
    itemsize = _ITEMSIZE.get(dtype)
    if itemsize is None:
        raise InvalidInput(f"tensor {name!r}: dtype {dtype!r:.60} is not carried",
                           code="invalid_dtype", param=name)
    nbytes = nonzero = itemsize
    for d in shape:
        if type(d) is not int and not isinstance(d, np.integer) or d < 0:   # bool is refused
            raise InvalidInput(f"tensor {name!r}: shape {list(shape)!r:.80} needs "
                               "non-negative integer dims", code="invalid_shape", param=name)
        nbytes *= int(d)
        nonzero *= int(d) or 1
    if len(shape) > P.MAX_RANK or nonzero > _MAX_ARRAY_BYTES:
        raise InvalidInput(f"tensor {name!r}: shape {list(shape)!r:.80} is larger than any "
                           f"array (at most {P.MAX_RANK} dims)", code="invalid_shape",
                           param=name)
    return nbytes


def check_dtype(name: str, arr: np.ndarray) -> str:
    """The dtype name `arr` travels under, refusing an array the wire cannot carry: an object
    array travels as BYTES only when every element is bytes or str."""
    dtype = arr.dtype
    if dtype.kind == "O":
        if all(isinstance(v, (bytes, str)) for v in arr.reshape(-1)):
            return BYTES
    else:
        wire = _WIRE_NAME.get(dtype.type)
        if wire is None and dtype.kind in "biuf" and dtype.name in _ITEMSIZE:
            # a scalar type of its own with a wire name (numpy's longlong is "int64" too)
            wire = _WIRE_NAME[dtype.type] = dtype.name
        if wire is not None:
            return wire
    raise InvalidInput(f"tensor {name!r}: dtype {dtype} cannot be sent", code="invalid_dtype",
                       param=name)


def encode(name: str, arr: Any) -> tuple[P.TensorRef, np.ndarray]:
    """A ref for `arr` (no location yet: the caller sets `frame` or `shm`) and the buffer that
    travels for it: BYTES serialized, else native-order C-ordered memory (a view if it was)."""
    arr = np.asarray(arr)
    dtype = check_dtype(name, arr)
    return P.TensorRef(name, dtype, tuple(map(int, arr.shape))), to_buffer(arr)


def frame_data(frame: Any) -> Any:
    """The buffer of a received frame (a zmq.Frame when received with copy=False)."""
    return frame.buffer if hasattr(frame, "buffer") else frame


def decode(ref: P.TensorRef, buffers: Sequence[Any], regions: RegionMap | None = None
           ) -> np.ndarray:
    """The array `ref` names: its inline frame among `buffers` (a view, no copy), or its
    bytes in a shared-memory region of `regions` (bounds-checked there)."""
    if ref.shm is not None:
        if regions is None:
            raise P.BadMessage(f"malformed message: tensor {ref.name!r} is in shared memory, "
                               "which this message cannot use")
        return regions.array(ref)
    index = ref.frame_index()
    if not 0 <= index < len(buffers):
        raise P.BadMessage(f"malformed message: tensor {ref.name!r} names frame {index} of "
                           f"{len(buffers)}")
    return from_buffer(ref.name, ref.dtype, ref.shape, frame_data(buffers[index]))
