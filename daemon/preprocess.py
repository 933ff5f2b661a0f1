"""Vision pre- and post-processing declared in model.toml: image bytes → tensor → top-k labels.

    [preprocess]                       [postprocess]
    kind = "image"                     kind = "classify"
    width = 224                        labels = ["cat", "dog"]   # default: the class index
    height = 224                       top_k = 5                 # default 5, capped at labels
    channels = 3        # 1 L, 3 RGB   output = "logits"         # default: the first output
    scale = 1.0         # 0..255 → [0, scale]                    softmax = true  # on logits
    invert = false      # 255 - v before scaling
    layout = "nchw"     # "flat" [B, H*W*C] | "nchw" [B, C, H, W] | "nhwc" [B, H, W, C]
    input = "pixels"    # default: the first input
    mean = [0.485, 0.456, 0.406]      # optional, per channel, after scaling
    std = [0.229, 0.224, 0.225]
    resample = "bilinear"             # nearest | bilinear | bicubic | box | lanczos
    max_pixels = 25000000             # bigger uploads are refused before decoding

This module reads and checks those sections (the repository parser, the upload check and the
frontends share it); frontends/image_codec.py applies them to requests. Config errors are
`InvalidInput` with the stable code `invalid_model_config` and the offending key in `param`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


from daemon.errors import InvalidInput

__all__ = ["ImageSpec", "ClassifySpec", "DEFAULT_MAX_PIXELS", "check_sections", "image_spec",
           "classify_spec", "bind_to_model"]

LAYOUTS = ("flat", "nchw", "nhwc")
RESAMPLE = ("nearest", "bilinear", "bicubic", "box", "lanczos")
MAX_SIDE = 8192                  # of the model's input, not of an upload
DEFAULT_MAX_PIXELS = 25_000_000  # about 5000 x 5000: a photo, not a decompression bomb
# Pillow walks these one by one in Python (~7 us each): bounded, a file made of empty ones
# cannot buy seconds of a worker's CPU. libpng writes 8 KiB IDATs: 20000 chunks is 160 MB.
_PRE_KEYS = {"kind", "width", "height", "channels", "scale", "invert", "layout", "input", "mean",
             "std", "resample", "max_pixels"}
_POST_KEYS = {"kind", "labels", "top_k", "output", "softmax"}


@dataclass(slots=True, frozen=True)
class ImageSpec:
    width: int
    height: int
    channels: int = 3
    scale: float = 1.0
    invert: bool = False
    layout: str = "nchw"
    input: str | None = None
    mean: tuple[float, ...] | None = None      # one per channel
    std: tuple[float, ...] | None = None
    resample: str = "bilinear"
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(slots=True, frozen=True)
class ClassifySpec:
    labels: tuple[str, ...] = ()
    top_k: int = 5
    output: str | None = None
    softmax: bool = False


# -- model.toml validation ----------------------------------------------------------------------

def check_sections(sections: dict[str, Any]) -> None:
    """Validate [preprocess] and [postprocess] if present (called by the repository parser)."""
    if "preprocess" in sections:
        image_spec(sections["preprocess"])
    if "postprocess" in sections:
        classify_spec(sections["postprocess"])


def image_spec(section: Any) -> ImageSpec:
    """Parse a [preprocess] table; raise `InvalidInput` (invalid_model_config) naming the key."""
    s = _table(section, "preprocess", _PRE_KEYS)
    if s.get("kind") != "image":
        raise _error(f"preprocess.kind must be \"image\", got {s.get('kind')!r}", "preprocess.kind")
    width, height = _int(s, "width", None, 1, MAX_SIDE), _int(s, "height", None, 1, MAX_SIDE)
    channels = _int(s, "channels", 3, 1, 3)
    if channels == 2:
        raise _error("preprocess.channels must be 1 (grayscale) or 3 (RGB)", "preprocess.channels")
    scale = _number(s, "scale", 1.0)
    if not scale > 0:
        raise _error("preprocess.scale must be > 0", "preprocess.scale")
    layout = _choice(s, "layout", "nchw", LAYOUTS)
    mean, std = _per_channel(s, "mean", channels), _per_channel(s, "std", channels)
    if std is not None and not all(x > 0 for x in std):
        raise _error("preprocess.std values must be > 0", "preprocess.std")
    return ImageSpec(width=width, height=height, channels=channels, scale=scale,
                     invert=_bool(s, "invert", False, "preprocess"), layout=layout,
                     input=_name(s, "input", "preprocess"), mean=mean, std=std,
                     resample=_choice(s, "resample", "bilinear", RESAMPLE),
                     max_pixels=_int(s, "max_pixels", DEFAULT_MAX_PIXELS, 1, 1 << 31))


def classify_spec(section: Any) -> ClassifySpec:
    """Parse a [postprocess] table; raise `InvalidInput` (invalid_model_config) naming the key."""
    s = _table(section, "postprocess", _POST_KEYS)
    if s.get("kind") != "classify":
        raise _error(f"postprocess.kind must be \"classify\", got {s.get('kind')!r}",
                     "postprocess.kind")
    labels = s.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise _error("postprocess.labels must be a list of strings", "postprocess.labels")
    top_k = s.get("top_k", 5)
    if not _is_int(top_k) or top_k < 1:
        raise _error("postprocess.top_k must be a positive integer", "postprocess.top_k")
    if labels and top_k > len(labels):
        raise _error(f"postprocess.top_k ({top_k}) exceeds the {len(labels)} labels",
                     "postprocess.top_k")
    return ClassifySpec(labels=tuple(labels), top_k=top_k, output=_name(s, "output", "postprocess"),
                        softmax=_bool(s, "softmax", False, "postprocess"))


def bind_to_model(pre: ImageSpec, post: ClassifySpec | None, inputs: list[dict[str, Any]],
                  outputs: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Check the sections against the loaded model's tensors (as in `ModelInfo` on the wire:
    {name, dtype, shape}); return (input name, output name). The batch dimension is shape[0]
    when the tensor has one more dimension than the layout needs."""
    input_name = pre.input or (inputs[0]["name"] if inputs else None)
    tensor = next((t for t in inputs if t["name"] == input_name), None)
    if tensor is None:
        raise _error(f"preprocess.input {input_name!r} is not an input of the model "
                     f"(inputs: {[t['name'] for t in inputs]})", "preprocess.input")
    want = {"flat": [pre.width * pre.height * pre.channels],
            "nchw": [pre.channels, pre.height, pre.width],
            "nhwc": [pre.height, pre.width, pre.channels]}[pre.layout]
    have = list(tensor["shape"])[-len(want):]
    if len(have) != len(want) or any(h not in (-1, w) for h, w in zip(have, want)):
        raise _error(f"preprocess gives {pre.layout} {want} per image; input {input_name!r} has "
                     f"shape {tensor['shape']}", "preprocess.layout")
    if post is None:
        return str(tensor["name"]), None
    output_name = post.output or (outputs[0]["name"] if outputs else None)
    out = next((t for t in outputs if t["name"] == output_name), None)
    if out is None:
        raise _error(f"postprocess.output {output_name!r} is not an output of the model "
                     f"(outputs: {[t['name'] for t in outputs]})", "postprocess.output")
    classes = out["shape"][-1] if out["shape"] else -1
    if post.labels and classes not in (-1, len(post.labels)):
        raise _error(f"postprocess.labels has {len(post.labels)} entries; output "
                     f"{output_name!r} has {classes} classes", "postprocess.labels")
    return str(tensor["name"]), str(out["name"])


# -- helpers for the parsers above ----------------------------------------------------------------

def _table(section: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise _error(f"[{where}] must be a table", where)
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise _error(f"[{where}] has unknown keys {unknown}", f"{where}.{unknown[0]}")
    return section


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(s: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int:
    value = s.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _error(f"preprocess.{key} must be an integer in [{lo}, {hi}], got {value!r}",
                     f"preprocess.{key}")
    return value


def _number(s: dict[str, Any], key: str, default: float) -> float:
    value = s.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _error(f"preprocess.{key} must be a finite number, got {value!r}",
                     f"preprocess.{key}")
    return float(value)


def _bool(s: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = s.get(key, default)
    if not isinstance(value, bool):
        raise _error(f"{where}.{key} must be true or false, got {value!r}", f"{where}.{key}")
    return value


def _choice(s: dict[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    value = s.get(key, default)
    if value not in choices:
        raise _error(f"preprocess.{key} must be one of {', '.join(choices)}, got {value!r}",
                     f"preprocess.{key}")
    return value


def _name(s: dict[str, Any], key: str, where: str) -> str | None:
    value = s.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise _error(f"{where}.{key} must be a tensor name", f"{where}.{key}")
    return value


def _per_channel(s: dict[str, Any], key: str, channels: int) -> tuple[float, ...] | None:
    value = s.get(key)
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if len(values) not in (1, channels) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            for x in values):
        raise _error(f"preprocess.{key} must be a number or a list of {channels}",
                     f"preprocess.{key}")
    return tuple(float(x) for x in values) * (channels if len(values) == 1 else 1)


def _error(message: str, key: str) -> InvalidInput:
    return InvalidInput(message, code="invalid_model_config", param=key)
