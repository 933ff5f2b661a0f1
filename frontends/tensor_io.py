"""Where the frontends' tensors travel: inline frames or the sender's shared-memory arena.
The bytes themselves are encoded and decoded by the tensor codec (daemon/tensor_bytes.py).

Small tensors travel as inline frames (zero-copy sends); tensors of at least `inline_threshold`
bytes are copied once into the sender's shared-memory arena and travel by reference. When the
arena is full the inline frame still carries the tensor: exhaustion costs speed, not requests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon import protocol as P
from daemon.errors import FerryError, InvalidInput
from daemon.shm import Arena, RegionMap
from daemon.tensor_bytes import check_dtype, decode, encode

__all__ = ["Packed", "pack", "unpack"]


@dataclass(slots=True)
class Packed:
    refs: list[P.TensorRef]
    frames: list[Any]
    blocks: list[P.ShmLoc] = field(default_factory=list)   # sender-arena blocks to free later


def pack(arrays: dict[str, np.ndarray], arena: Arena | None, inline_threshold: int,
         region_refs: list[P.TensorRef] = ()) -> Packed:  # type: ignore[assignment]
    """References for `arrays`; `region_refs` are tensors already in a registered region."""
    out = Packed(list(region_refs), [])
    for ref in region_refs:
        if ref.name in arrays:
            raise InvalidInput(f"input {ref.name!r} given twice", code="invalid_input",
                               param=ref.name)
    # validate everything first: a refusal after a put would leak that arena block
    for name, arr in arrays.items():
        check_dtype(name, arr)
    for name, arr in arrays.items():
        ref, arr = encode(name, arr)  # BYTES: serialized; else native-order, C-ordered memory
        if arena is not None and arr.nbytes >= inline_threshold:
            try:
                ref.shm = arena.put(arr)
                out.blocks.append(ref.shm)
            except FerryError:
                ref.shm = None
        if ref.shm is None:
            ref.frame = len(out.frames)
            out.frames.append(arr)
        out.refs.append(ref)
    return out


def unpack(refs: list[P.TensorRef], buffers: list[Any], regions: RegionMap,
           engine_arena_prefix: str | None = None) -> tuple[dict[str, np.ndarray],
                                                            list[P.ShmLoc]]:
    """Arrays for `refs` (views, no copy) and the engine-arena blocks to free after use."""
    arrays: dict[str, np.ndarray] = {}
    frees: list[P.ShmLoc] = []
    for ref in refs:
        arrays[ref.name] = decode(ref, buffers, regions)
        if ref.shm is not None and engine_arena_prefix and \
                ref.shm.region.startswith(engine_arena_prefix):
            frees.append(ref.shm)
    return arrays, frees
