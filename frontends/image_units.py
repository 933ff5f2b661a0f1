"""What a request to an image model costs against a key's tokens per minute, for every
frontend (HTTP, ZeroMQ): each image counts the model's `units_per_image` (model.toml
[diffusion], reported by the engine in its ModelInfo extra)."""
from __future__ import annotations

from typing import Any

import numpy as np

from daemon.errors import FerryError

__all__ = ["PLATFORM", "units_per_image", "tensor_units"]

PLATFORM = "ferry_diffusion"


def units_per_image(desc: dict[str, Any]) -> int:
    """`desc`: the engine's diffusion description (ModelInfo extra["diffusion"])."""
    return int(desc.get("units_per_image", 1) or 1)


def tensor_units(d: Any, model: str, version: int | None,
                 arrays: dict[str, np.ndarray]) -> int:
    """The units of a tensor request (KServe, ZMQ, a batch item) to `model` through dispatcher
    `d`: num_images x units_per_image for an image model, read as the engine will read
    `num_images` (clamped to what it accepts: a value it refuses fails the request, which is
    refunded or settled by the caller); 0 for any other model or an unknown one."""
    try:
        _, _, info = d.resolve(model, version)
    except FerryError:
        return 0                      # the infer that follows answers the error
    if info.get("platform") != PLATFORM:
        return 0
    desc = (info.get("extra") or {}).get("diffusion") or {}
    n = 1
    given = arrays.get("num_images")
    if given is not None and given.size == 1 and given.dtype.kind in "iu":
        n = min(max(int(given.reshape(-1)[0]), 1), int(desc.get("max_images", 4)))
    return n * units_per_image(desc)
