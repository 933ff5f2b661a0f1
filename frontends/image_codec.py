"""Uploaded images into tensors, and scores into labels, as a model's [preprocess] and
[postprocess] sections (daemon/preprocess.py reads and checks them) say. Pure functions: the
HTTP vision routes and the tests call them.

Request errors carry their own codes: `empty_file`, `invalid_image`, `image_too_large`.
"""
from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from daemon.errors import InvalidInput, PayloadTooLarge
from daemon.preprocess import DEFAULT_MAX_PIXELS, ClassifySpec, ImageSpec

__all__ = ["IMAGE_FORMATS", "MAX_PNG_CHUNKS", "MAX_JPEG_MARKERS", "decode_image",
           "image_to_tensor", "classify"]

IMAGE_FORMATS = ("PNG", "JPEG")
MAX_PNG_CHUNKS = 20_000
MAX_JPEG_MARKERS = 2_000         # up to the first scan; a photo has a few dozen
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft: ImageSpec | None = None) -> Any:
    """Decode PNG or JPEG bytes into a loaded `PIL.Image`, refusing anything else.

    The file's chunk (PNG) or marker (JPEG) count is bounded first, then the header is
    checked (format, then dimensions against `max_pixels`) before any pixel is decoded, so a
    small file that claims 100000 x 100000 costs nothing; `verify()` then checks
    the file's structure (PNG chunk CRCs) before the real decode. With `draft`, a JPEG decodes
    at the smallest DCT scale still at least the model's size (a 12 MP photo for a 224 x 224
    model decodes at 1/8 size)."""
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
