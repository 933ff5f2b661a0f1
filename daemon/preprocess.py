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

The functions here are pure (no sockets, no daemon state), so the repository parser, the upload
check and the HTTP route share them. Config errors are `InvalidInput` with the stable code
`invalid_model_config` and the offending key in `param`; request errors carry their own codes
(`empty_file`, `invalid_image`, `image_too_large`).
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from daemon.errors import InvalidInput, PayloadTooLarge

__all__ = ["ImageSpec", "ClassifySpec", "IMAGE_FORMATS", "check_sections", "image_spec",
           "classify_spec", "bind_to_model", "decode_image", "image_to_tensor", "classify"]

IMAGE_FORMATS = ("PNG", "JPEG")
LAYOUTS = ("flat", "nchw", "nhwc")
RESAMPLE = ("nearest", "bilinear", "bicubic", "box", "lanczos")
MAX_SIDE = 8192                  # of the model's input, not of an upload
DEFAULT_MAX_PIXELS = 25_000_000  # about 5000 x 5000: a photo, not a decompression bomb
# Pillow walks these one by one in Python (~7 us each): bounded, a file made of empty ones
# cannot buy seconds of a worker's CPU. libpng writes 8 KiB IDATs: 20000 chunks is 160 MB.
MAX_PNG_CHUNKS = 20_000
MAX_JPEG_MARKERS = 2_000         # up to the first scan; a photo has a few dozen
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
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


# -- requests -------------------------------------------------------------------------------------

def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft: ImageSpec | None = None) -> Any:
    """Decode PNG or JPEG bytes into a loaded `PIL.Image`, refusing anything else.

    The file's chunk (PNG) or marker (JPEG) count is bounded first, then the header is
    checked (format, then dimensions against `max_pixels`) before any pixel is decoded, so a
    small file that claims 100000 x 100000 costs nothing; `verify()` then checks
    the file's structure (PNG chunk CRCs) before the real decode. With `draft`, a JPEG decodes
    at the smallest DCT scale still at least the model's size (a 12 MP photo for a 224 x 224
    model decodes at 1/8 size)."""
    from PIL import Image, UnidentifiedImageError
    if not data:
        raise InvalidInput("the uploaded file is empty", code="empty_file", param="file")
    _check_structure(data)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: make it an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as probe:
                _check_size(probe.size, max_pixels)
                probe.verify()
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            if draft is not None and img.format == "JPEG":
                img.draft("L" if draft.channels == 1 else "RGB", (draft.width, draft.height))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large("the image", max_pixels) from None
    except UnidentifiedImageError:
        raise InvalidInput("the file is not a PNG or JPEG image", code="invalid_image",
                           param="file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:   # Pillow's corrupt-file errors
        raise InvalidInput(f"the image is corrupt: {exc}", code="invalid_image",
                           param="file") from None
    return img


def image_to_tensor(img: Any, spec: ImageSpec) -> np.ndarray:
    """A decoded image → float32 [1, H*W*C] (flat, HWC order), [1, C, H, W] or [1, H, W, C]."""
    from PIL import Image, ImageOps
    img = ImageOps.exif_transpose(img)          # phone photos store their rotation in EXIF
    mode = "L" if spec.channels == 1 else "RGB"
    if img.mode != mode:
        img = img.convert(mode)                 # alpha is dropped, not composited
    if img.size != (spec.width, spec.height):
        filt = getattr(Image.Resampling, spec.resample.upper())
        img = img.resize((spec.width, spec.height), filt)
    arr: np.ndarray = np.asarray(img, dtype=np.float32).reshape(
        spec.height, spec.width, spec.channels)
    if spec.invert:
        arr = 255.0 - arr
    arr = arr * np.float32(spec.scale / 255.0)                         # [H, W, C]
    if spec.mean is not None:
        arr = arr - np.asarray(spec.mean, dtype=np.float32)
    if spec.std is not None:
        arr = arr / np.asarray(spec.std, dtype=np.float32)
    if spec.layout == "flat":
        return np.ascontiguousarray(arr.reshape(1, -1))                # [1, H*W*C]
    if spec.layout == "nchw":
        return np.ascontiguousarray(arr.transpose(2, 0, 1)[None])      # [1, C, H, W]
    return np.ascontiguousarray(arr[None])                             # [1, H, W, C]


def classify(scores: np.ndarray, spec: ClassifySpec, top_k: int | None = None
             ) -> list[dict[str, Any]]:
    """Top-k {label, index, score} of one image's scores (any shape ending in the classes)."""
    row = np.asarray(scores, dtype=np.float64).reshape(-1)
    if spec.softmax:
        row = np.exp(row - row.max())
        row /= row.sum()
    k = min(top_k or spec.top_k, row.size)
    order = np.argsort(-row, kind="stable")[:k]
    return [{"label": spec.labels[i] if i < len(spec.labels) else str(i), "index": int(i),
             "score": float(row[i])} for i in order]


# -- helpers for the parsers above ----------------------------------------------------------------

def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidInput(f"the image has no pixels ({width}x{height})", code="invalid_image",
                           param="file")
    if width * height > max_pixels:
        raise _too_large(f"the image ({width}x{height})", max_pixels)


def _check_structure(data: bytes) -> None:
    """Refuse a PNG of more than MAX_PNG_CHUNKS chunks, or a JPEG of more than
    MAX_JPEG_MARKERS markers (fill bytes included) before its first scan. The count stops at
    the limit, so it costs at most a few milliseconds."""
    if data.startswith(_PNG_SIGNATURE):
        pos, limit, what = len(_PNG_SIGNATURE), MAX_PNG_CHUNKS, "chunks"
        for _ in range(limit + 1):
            if pos + 8 > len(data):
                return
            pos += 12 + int.from_bytes(data[pos:pos + 4], "big")    # length, type, data, CRC
    elif data.startswith(b"\xff\xd8"):
        pos, limit, what = 2, MAX_JPEG_MARKERS, "markers before its first scan"
        for _ in range(limit + 1):
            if pos + 4 > len(data) or data[pos] != 0xFF or data[pos + 1] in (0xDA, 0xD9):
                return                                   # a scan, the end, or not a marker
            marker = data[pos + 1]
            if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD7:
                pos += 1 if marker == 0xFF else 2         # fill byte, or no length field
            else:
                pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    else:
        return
    raise InvalidInput(f"the image holds more than {limit} {what}", code="invalid_image",
                       param="file")


def _too_large(what: str, max_pixels: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{what} exceeds the limit of {max_pixels} pixels",
                           code="image_too_large", param="file")


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
