"""A tensor's bytes on the wire and in shared memory, for every dtype Ferry carries.

Fixed-size dtypes travel as their raw memory. BYTES tensors (numpy object arrays of `bytes`,
the dtype name "bytes" in model.toml, protocol refs and TensorSpecs) travel in Triton's
serialized form: each element as a 4-byte little-endian length and then its bytes, row major.
That is also the form a client writes into a shared-memory region and the binary-data extension
carries, so a BYTES tensor is serialized once, by whoever made it, and parsed once, by whoever
reads it. Both sides of every process boundary import this one module.
"""
from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from daemon.errors import InvalidInput

__all__ = ["BYTES", "wire_dtype", "to_buffer", "from_buffer", "serialize", "deserialize",
           "element_bytes"]

BYTES = "bytes"
_LEN = struct.Struct("<I")


def wire_dtype(arr: np.ndarray) -> str:
    """The dtype name a tensor travels under: "bytes" for object arrays, else numpy's name."""
    return BYTES if arr.dtype == object else arr.dtype.name


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
    """The array `data` holds (a view for fixed-size dtypes, parsed for BYTES)."""
    if dtype == BYTES:
        return deserialize(data, shape, name)
    size = memoryview(data).nbytes
    need = np.dtype(dtype).itemsize * math.prod(shape)   # exact: an int64 product can wrap
    if size != need:
        raise InvalidInput(f"tensor {name!r}: frame holds {size} bytes, dtype and shape need "
                           f"{need}", code="invalid_shape", param=name)
    return np.frombuffer(data, dtype=dtype).reshape(shape)
