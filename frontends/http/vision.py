"""Image predict for vision models: an uploaded PNG or JPEG, preprocessed as the model's
model.toml declares ([preprocess], [postprocess]; see daemon.preprocess), run through the
model, answered as top-k labels.

    curl -F file=@seven.png 'http://127.0.0.1:8000/v1/models/digits/predict?top_k=3'
    {"model": "digits", "model_version": "1", "model_id": "<sha256 of the weights>",
     "predictions": [{"label": "7", "index": 7, "score": 0.98}, ...], "request_id": "..."}

The model may be named by its name or by a version's SHA-256 id; `?version=N` (or
`/v1/models/{model}/versions/{version}/predict`) pins a version, otherwise the newest ready one
serves. The image comes as multipart/form-data in a field named `file` (or `image`), or as the
raw body with Content-Type image/png or image/jpeg. Errors: 415 unsupported_media_type,
400 missing_file / empty_file / too_many_files / invalid_image / invalid_multipart /
not_a_vision_model / invalid_parameter, 413 image_too_large / payload_too_large.
"""
from __future__ import annotations

import asyncio
import ctypes
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from daemon.errors import FerryError, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from daemon.preprocess import ClassifySpec, ImageSpec, bind_to_model, classify_spec, image_spec
from frontends.image_codec import classify, decode_image, image_to_tensor
from frontends.http.appkeys import DISPATCHER, SETTINGS
from frontends.http.errors import request_id_of
from frontends.http.security import authorize_model

__all__ = ["routes", "setup", "VisionConfig"]

routes = web.RouteTableDef()
FILE_FIELDS = ("file", "image")
RAW_TYPES = ("image/png", "image/jpeg")
_CACHE_MAX = 256
# Image decodes at once per worker: one at the pixel limit holds ~125 MB while it runs.
_DECODE_SLOTS = 2
_M_MMAP_THRESHOLD = -3      # glibc mallopt() parameter


@dataclass(slots=True, frozen=True)
class VisionConfig:
    """One model version's processing, bound to its tensors."""

    image: ImageSpec
    classify: ClassifySpec | None
    input: str
    output: str | None
    dtype: str                  # the input tensor's dtype
    batched: bool               # the model takes a leading batch dimension


CONFIGS = web.AppKey("vision_configs", dict)
DECODES = web.AppKey("vision_decodes", asyncio.Semaphore)


def setup(app: web.Application) -> None:
    app[CONFIGS] = {}
    app[DECODES] = asyncio.Semaphore(_DECODE_SLOTS)
    _return_large_blocks_to_the_os()
    app.add_routes(routes)


def _return_large_blocks_to_the_os() -> None:
    """Serve every allocation of 4 MiB or more (decoded images, big bodies) from its own
    mapping, unmapped when freed. glibc's default threshold grows with the blocks freed, so
    their pages stay in per-thread arenas: eight concurrent uploads at the pixel limit left
    the worker ~900 MB larger for good. A no-op where the C library has no mallopt()."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 4 << 20)


@routes.post("/v1/models/{model}/predict")
@routes.post("/v1/models/{model}/versions/{version}/predict")
async def predict(request: web.Request) -> web.Response:
    d, settings = request.app[DISPATCHER], request.app[SETTINGS]
    # The security middleware finds no model in a multipart body: check the path's here.
    authorize_model(request, request.match_info["model"])
    name, version, info = d.resolve(request.match_info["model"], _version(request))
    entry = d.placement.models[name]["versions"][str(version)]  # type: ignore[union-attr]
    cfg = _config(request.app, name, version, entry, info)
    top_k = _top_k(request, cfg)
    data = await _read_image(request, settings.max_body)
    async with request.app[DECODES]:
        tensor = await asyncio.get_running_loop().run_in_executor(None, _tensor, data, cfg)
    outcome = await d.infer(name, version, {cfg.input: tensor},
                            outputs=[cfg.output] if cfg.output else None,
                            timeout_s=settings.request_timeout_s,
                            request_id=request_id_of(request))
    body: dict[str, Any] = {"model": name, "model_version": str(version),
                            "model_id": entry.get("sha256")}
    try:
        if cfg.classify is not None and cfg.output is not None:
            scores = outcome.arrays[cfg.output]
            body["predictions"] = classify(scores[0] if cfg.batched else scores, cfg.classify,
                                           top_k)
        else:   # no [postprocess]: the raw outputs of the one image
            body["outputs"] = {k: (v[0] if cfg.batched else v).tolist()
                               for k, v in outcome.arrays.items()}
    finally:
        outcome.release()
    body["request_id"] = request_id_of(request)
    return web.json_response(body)


def _version(request: web.Request) -> int | None:
    raw = request.match_info.get("version") or request.query.get("version")
    if raw is None or raw == "":
        return None
    if (value := _positive_int(raw)) is None:
        raise InvalidInput(f"version {raw!r:.40} must be a positive integer", param="version")
    return value


def _top_k(request: web.Request, cfg: VisionConfig) -> int | None:
    raw = request.query.get("top_k")
    if raw is None:
        return None
    if cfg.classify is None:
        raise InvalidInput("top_k needs a model with a [postprocess] kind = \"classify\" table",
                           code="invalid_parameter", param="top_k")
    if (value := _positive_int(raw)) is None:
        raise InvalidInput(f"top_k {raw!r:.40} must be a positive integer",
                           code="invalid_parameter", param="top_k")
    return value


def _positive_int(raw: str) -> int | None:
    """`raw` as an integer in [1, 10**18), else None. The length goes first: int() of more
    than 4300 digits raises ValueError, and "²".isdigit() holds yet int("²") fails."""
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18) or int(raw) < 1:
        return None
    return int(raw)


def _config(app: web.Application, name: str, version: int, entry: dict[str, Any],
            info: dict[str, Any]) -> VisionConfig:
    """The version's processing, cached by its path, weights and model.toml mtime (an in-place
    reload may change either)."""
    path = Path(entry.get("path", ""))
    try:
        mtime = (path / "model.toml").stat().st_mtime_ns
    except OSError:
        mtime = 0
    key = (name, version, str(path), entry.get("sha256"), mtime)
    cache = app[CONFIGS]
    cfg = cache.get(key)
    if cfg is None:
        cfg = _build_config(name, path, info)
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[key] = cfg
    return cfg


def _build_config(name: str, path: Path, info: dict[str, Any]) -> VisionConfig:
    try:
        with open(path / "model.toml", "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FerryError(f"cannot read {name!r}'s model.toml: {exc}", code="model_config_error",
                         status=500) from None
    if not isinstance(raw.get("preprocess"), dict):
        raise InvalidInput(f"model {name!r} takes no images: its model.toml has no [preprocess] "
                           "table (kind = \"image\")", code="not_a_vision_model", param="model")
    try:
        pre = image_spec(raw["preprocess"])
        post = classify_spec(raw["postprocess"]) if "postprocess" in raw else None
        input_name, output_name = bind_to_model(pre, post, info["inputs"], info["outputs"])
    except InvalidInput as exc:   # the operator's model.toml, not the client's request
        raise FerryError(f"model {name!r} is misconfigured: {exc.message}",
                         code="invalid_model_config", status=500, param=exc.param) from None
    dtype = next(t["dtype"] for t in info["inputs"] if t["name"] == input_name)
    return VisionConfig(pre, post, input_name, output_name, dtype,
                        int(info.get("max_batch_size", 0)) > 0)


async def _read_image(request: web.Request, limit: int) -> bytes:
    ctype = request.content_type
    if ctype in RAW_TYPES:
        body = await request.read()   # bounded by client_max_size (413)
        if not body:
            raise InvalidInput("the request body is empty", code="empty_file", param="file")
        return body
    if not ctype.startswith("multipart/form-data"):
        raise UnsupportedMediaType(f"content type {ctype!r} is not accepted; send the image as "
                                   "multipart/form-data in a field named 'file', or as the "
                                   "body with Content-Type image/png or image/jpeg")
    data: bytes | None = None
    used = 0        # every part counts: a huge form field is refused like a huge image
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise InvalidInput("nested multipart bodies are not accepted",
                                   code="invalid_multipart")
            is_file = part.name in FILE_FIELDS
            if is_file and data is not None:
                raise InvalidInput("send one image per request", code="too_many_files",
                                   param="file")
            body, size = await _read_part(part, limit - used, limit, keep=is_file)
            used += size
            if is_file:
                data = body
    # aiohttp's errors for a malformed body
    except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as exc:
        raise InvalidInput(f"malformed multipart body: {exc}", code="invalid_multipart") from None
    if data is None:
        raise InvalidInput("no image: send it in a multipart field named 'file' (or 'image')",
                           code="missing_file", param="file")
    return data


async def _read_part(part: BodyPartReader, room: int, limit: int, keep: bool
                     ) -> tuple[bytes, int]:
    """The part's bytes (b"" unless `keep`) and size; 413 once it needs more than `room`."""
    chunks, size = [], 0
    while chunk := await part.read_chunk(1 << 16):
        size += len(chunk)
        if size > room:
            raise PayloadTooLarge(f"the upload exceeds the limit of {limit} bytes",
                                  param="file")
        if keep:
            chunks.append(chunk)
    return b"".join(chunks), size


def _tensor(data: bytes, cfg: VisionConfig) -> np.ndarray:
    with decode_image(data, max_pixels=cfg.image.max_pixels, draft=cfg.image) as img:
        tensor = image_to_tensor(img, cfg.image).astype(cfg.dtype, copy=False)
    return tensor if cfg.batched else tensor[0]
