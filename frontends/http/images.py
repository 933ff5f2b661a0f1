"""Image generation over HTTP: OpenAI's `POST /v1/images/generations` and seed 002's
`/v1/infer` (`seed002_infer`, mounted by the seed-compatibility routes).

Both run a diffusion model (engine "diffusion", platform `ferry_diffusion`) through the Infer
path: the request becomes tensors (prompt, num_inference_steps, guidance_scale, width, height,
seed, num_images), the engine answers PNGs and their seeds (engines/diffusion/engine.py). Each
image counts `units_per_image` (model.toml [diffusion], default 1) against the key's tokens per
minute: reserved before the engine runs, charged when the images are delivered, refunded when
the request fails. The same holds on the other paths to an image model: KServe infer
(`reserve_tensor_units`), WebSocket `inference` messages (frontends/http/ws.py, which also
streams each image's denoising steps as `progress` events) and batch items
(frontends/http/batch_runner.py, url `/v1/images/generations` or the KServe one).

    curl -d '{"model": "digits-diffusion", "prompt": "a handwritten 7", "n": 2,
              "size": "64x64", "seed": 7}' http://127.0.0.1:8000/v1/images/generations
    {"created": 1764770000, "data": [{"b64_json": "iVBORw0...", "seed": 7}, ...],
     "usage": {"input_tokens": 0, "output_tokens": 2, "total_tokens": 2}}

OpenAI fields: `model` (optional when exactly one image model is loaded), `prompt`, `n`,
`size` ("WxH" or "auto": the model's native size), `response_format` (only "b64_json": Ferry
keeps no image store, so "url" is a 400 `unsupported_response_format`), `output_format`
("png" only); `quality`, `style`, `user`, `background`, `moderation` are accepted and ignored.
Extensions: `seed` (image i gets seed + i), `negative_prompt`, `num_inference_steps`,
`guidance_scale`.
"""
from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from aiohttp import web

from daemon import protocol as P
from daemon.errors import FerryError, InvalidInput
from frontends.dispatch import Dispatcher
from frontends.image_units import PLATFORM, tensor_units, units_per_image
from frontends.http.appkeys import DISPATCHER, SETTINGS
from frontends.http.errors import request_id_of
from frontends.http.json_body import decode_json
from frontends.http.security import authorize_model
from frontends.http.textgen import TOKEN_RESERVER, USAGE, Usage

__all__ = ["routes", "setup", "seed002_infer", "images_generations", "PLATFORM", "ImageJob",
           "parse_openai_images", "run_images", "openai_images_body", "image_usage",
           "is_image_model", "reserve_tensor_units", "in_openai_terms", "IMAGES_PATH"]

routes = web.RouteTableDef()
IMAGES_PATH = "/v1/images/generations"
_SEED_LIMIT = 2 ** 63 - 1
_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
_OPENAI_PROMPT_CHARS = 32000
_SEED002_PROMPT_CHARS = 1000


def setup(app: web.Application) -> None:
    app.add_routes(routes)


# -- fields -------------------------------------------------------------------------------------

def _bad(message: str, param: str, code: str = "invalid_parameter") -> InvalidInput:
    return InvalidInput(message, code=code, param=param)


async def _json_object(request: web.Request) -> dict[str, Any]:
    body = decode_json(await request.read())
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object", code="invalid_json")
    return body


def _int_field(body: dict[str, Any], name: str, default: int | None, lo: int,
               hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an integer between {lo} and {hi}", name)
    if not lo <= value <= hi:
        raise _bad(f"{name} must be between {lo} and {hi}, got {value}", name)
    return value


def _float_field(body: dict[str, Any], name: str, default: float | None, lo: float,
                 hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{name} must be a number between {lo:g} and {hi:g}", name)
    if not lo <= value <= hi:
        raise _bad(f"{name} must be between {lo:g} and {hi:g}, got {value}", name)
    return float(value)


def _str_field(body: dict[str, Any], name: str, *, required: bool, max_chars: int,
               empty_ok: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise _bad(f"{name} is required", name, code="missing_field")
        return None
    if not isinstance(value, str):
        raise _bad(f"{name} must be a string", name)
    if not value and not empty_ok:
        raise _bad(f"{name} must not be empty", name)
    if len(value) > max_chars:
        raise _bad(f"{name} is longer than {max_chars} characters", name)
    return value


# -- the engine call ----------------------------------------------------------------------------

@dataclass(slots=True)
class ImageJob:
    """One validated generation request: `n` images of `width` x `height` from a model."""

    name: str
    version: int
    desc: dict[str, Any]
    prompt: str
    negative: str | None
    n: int
    width: int
    height: int
    steps: int | None
    guidance: float | None
    seed: int | None

    @property
    def units(self) -> int:
        """What the images count against a key's tokens per minute."""
        return self.n * units_per_image(self.desc)


def image_model(d: Dispatcher, model: str, param: str = "model") -> tuple[str, int, dict]:
    """(name, version, the engine's diffusion description) of a loaded image model."""
    name, version, info = d.resolve(model)
    if info.get("platform") != PLATFORM:
        raise _bad(f"model {name!r} is not an image-generation model", param,
                   code="not_an_image_model")
    desc = (info.get("extra") or {}).get("diffusion") or {}
    return name, version, desc


def is_image_model(d: Dispatcher, model: Any) -> bool:
    """Whether `model` names a loaded image model (False for anything else, unknown too)."""
    if not isinstance(model, str):
        return False
    try:
        return d.resolve(model)[2].get("platform") == PLATFORM
    except FerryError:
        return False


def _only_image_model(d: Dispatcher) -> str:
    pl = d.placement
    names = sorted(
        name for name, entry in (pl.models.items() if pl is not None else ())
        if any((v.get("info") or {}).get("platform") == PLATFORM
               for v in entry.get("versions", {}).values() if v.get("state") == "ready"))
    if len(names) != 1:
        raise _bad("model is required" + (f" (one of {', '.join(names)})" if names else
                                          ": no image-generation model is loaded"),
                   "model", code="missing_field")
    return names[0]


async def reserve_tensor_units(d: Dispatcher, model: str, version: int | None,
                               arrays: dict[str, np.ndarray]) -> int:
    """For a tensor request (KServe infer, a batch item) to an image model: reserve its images'
    units from the caller's budget (textgen.TOKEN_RESERVER) and return them; 0 for any other
    model (frontends/image_units.py)."""
    units = tensor_units(d, model, version, arrays)
    reserve = TOKEN_RESERVER.get()
    if units and reserve is not None:
        await reserve(units)
    return units


async def run_images(d: Dispatcher, job: ImageJob, *, timeout_s: float | None,
                     request_id: str, on_progress: Callable[[P.Progress], None] | None = None
                     ) -> tuple[list[bytes], list[int]]:
    """Run one generation; the caller's budget (textgen.TOKEN_RESERVER) is debited
    `job.units` first. With `on_progress`, every denoising step of every image is reported
    (P.Progress) as the engine takes it."""
    reserve = TOKEN_RESERVER.get()
    if reserve is not None:
        await reserve(job.units)
    arrays: dict[str, np.ndarray] = {
        "prompt": np.array([job.prompt.encode()], dtype=object),
        "num_images": np.array([job.n], dtype=np.int64),
        "width": np.array([job.width], dtype=np.int64),
        "height": np.array([job.height], dtype=np.int64)}
    if job.negative:
        arrays["negative_prompt"] = np.array([job.negative.encode()], dtype=object)
    if job.steps is not None:
        arrays["num_inference_steps"] = np.array([job.steps], dtype=np.int64)
    if job.guidance is not None:
        arrays["guidance_scale"] = np.array([job.guidance], dtype=np.float32)
    if job.seed is not None:
        arrays["seed"] = np.array([job.seed], dtype=np.int64)
    outcome = await d.infer(job.name, job.version, arrays, outputs=["images", "seeds"],
                            timeout_s=timeout_s, request_id=request_id,
                            on_progress=on_progress)
    try:
        pngs = [bytes(p) for p in outcome.arrays["images"].reshape(-1)]
        seeds = [int(s) for s in outcome.arrays["seeds"].reshape(-1)]
    finally:
        outcome.release()
    return pngs, seeds


async def generate_images(request: web.Request, job: ImageJob) -> tuple[list[bytes], list[int]]:
    """`run_images` for an HTTP request: its timeout, its request id, its usage logged."""
    pngs, seeds = await run_images(request.app[DISPATCHER], job,
                                   timeout_s=request.app[SETTINGS].request_timeout_s,
                                   request_id=request_id_of(request))
    request[USAGE] = Usage(prompt_tokens=0, completion_tokens=job.units)
    return pngs, seeds


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def image_usage(units: int) -> dict[str, int]:
    """`usage` in the form of OpenAI's image responses; output tokens are the images' units."""
    return {"input_tokens": 0, "output_tokens": units, "total_tokens": units}


def openai_images_body(job: ImageJob, pngs: list[bytes], seeds: list[int]) -> dict[str, Any]:
    return {"created": int(time.time()),
            "data": [{"b64_json": _b64(p), "seed": s} for p, s in zip(pngs, seeds)],
            "usage": image_usage(job.units)}


# -- OpenAI -------------------------------------------------------------------------------------

def parse_openai_images(d: Dispatcher, body: dict[str, Any],
                        authorize: Callable[[str], None] | None = None) -> ImageJob:
    """An OpenAI images body (HTTP, WebSocket `inference` messages, batch items) as a job.
    `authorize` checks a model the body left out (the only image model served)."""
    model = _str_field(body, "model", required=False, max_chars=256)
    if model is None:
        model = _only_image_model(d)
        if authorize is not None:
            authorize(model)
    name, version, desc = image_model(d, model)
    prompt = _str_field(body, "prompt", required=True, max_chars=_OPENAI_PROMPT_CHARS)
    assert prompt is not None
    fmt = body.get("response_format")
    if fmt == "url":
        raise _bad("response_format 'url' is not served: Ferry keeps no image store; ask for "
                   "b64_json", "response_format", code="unsupported_response_format")
    if fmt is not None and fmt != "b64_json":
        raise _bad("response_format must be 'b64_json'", "response_format")
    out_fmt = body.get("output_format")
    if out_fmt is not None and out_fmt != "png":
        raise _bad("output_format must be 'png'", "output_format")
    n = _int_field(body, "n", 1, 1, int(desc.get("max_images", 4)))
    width, height = _size(body.get("size"), desc)
    negative = _str_field(body, "negative_prompt", required=False,
                          max_chars=_OPENAI_PROMPT_CHARS, empty_ok=True)
    steps = _int_field(body, "num_inference_steps", None, 1, int(desc.get("max_steps", 150)))
    guidance = _float_field(body, "guidance_scale", None, 1.0,
                            float(desc.get("max_guidance", 20.0)))
    seed = _int_field(body, "seed", None, 0, _SEED_LIMIT)
    assert n is not None
    return ImageJob(name, version, desc, prompt, negative, n, width, height, steps, guidance,
                    seed)


def in_openai_terms(exc: FerryError) -> FerryError:
    """The engine's size limits name `width`/`height`; OpenAI's body names `size`."""
    if exc.param in ("width", "height"):
        exc.param = "size"
    return exc


@routes.post(IMAGES_PATH)
async def images_generations(request: web.Request) -> web.Response:
    body = await _json_object(request)
    job = parse_openai_images(request.app[DISPATCHER], body,
                              lambda model: authorize_model(request, model))
    try:
        pngs, seeds = await generate_images(request, job)
    except FerryError as exc:
        raise in_openai_terms(exc)
    return web.json_response(openai_images_body(job, pngs, seeds))


def _size(raw: Any, desc: dict[str, Any]) -> tuple[int, int]:
    native = int(desc.get("width", 512)), int(desc.get("height", 512))
    if raw is None or raw == "auto":
        return native
    match = _SIZE.match(raw) if isinstance(raw, str) else None
    if match is None:
        raise _bad("size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto'", "size")
    return int(match.group(1)), int(match.group(2))


# -- seed 002 -----------------------------------------------------------------------------------

async def seed002_infer(request: web.Request) -> web.Response:
    """Seed 002's `POST /infer` / `/v1/infer` (its README's request and response, exactly):
    model_id (a model's SHA-256 id, or its name), prompt (<= 1000 chars), negative_prompt,
    num_inference_steps 1-150 (30), guidance_scale 1-20 (7.5), width/height 256-1024 (512),
    seed (random), num_images 1-4 (1) -> base64 PNGs with their seeds and processing_time.
    A value out of range is a 400 whose `param` names the field."""
    started = time.perf_counter()
    d = request.app[DISPATCHER]
    body = await _json_object(request)
    rid = _str_field(body, "id", required=True, max_chars=256)
    model_id = _str_field(body, "model_id", required=True, max_chars=256)
    assert rid is not None and model_id is not None
    prompt = _str_field(body, "prompt", required=True, max_chars=_SEED002_PROMPT_CHARS)
    negative = _str_field(body, "negative_prompt", required=False,
                          max_chars=_SEED002_PROMPT_CHARS, empty_ok=True)
    steps = _int_field(body, "num_inference_steps", 30, 1, 150)
    guidance = _float_field(body, "guidance_scale", 7.5, 1.0, 20.0)
    width = _int_field(body, "width", 512, 256, 1024)
    height = _int_field(body, "height", 512, 256, 1024)
    seed = _int_field(body, "seed", None, 0, _SEED_LIMIT)
    n = _int_field(body, "num_images", 1, 1, 4)
    assert prompt is not None and steps is not None and guidance is not None
    assert width is not None and height is not None and n is not None
    authorize_model(request, model_id)
    name, version, desc = image_model(d, model_id, "model_id")
    pngs, seeds = await generate_images(request, ImageJob(
        name, version, desc, prompt, negative, n, width, height, steps, guidance, seed))
    return web.json_response({
        "id": rid, "model_id": model_id,
        "images": [{"base64": _b64(p), "seed": s, "width": width, "height": height}
                   for p, s in zip(pngs, seeds)],
        "processing_time": round(time.perf_counter() - started, 4),
        "prompt": prompt, "negative_prompt": negative, "num_inference_steps": steps,
        "guidance_scale": guidance})


def openapi_paths() -> dict[str, Any]:
    """The OpenAPI path item of /v1/images/generations (frontends/http/openapi.py adds it)."""
    string = {"type": "string"}
    error = {"$ref": "#/components/responses/Error"}
    request = {"type": "object", "required": ["prompt"], "properties": {
        "model": {"type": "string", "minLength": 1, "maxLength": 256},
        "prompt": {"type": "string", "minLength": 1, "maxLength": _OPENAI_PROMPT_CHARS},
        "n": {"type": "integer", "minimum": 1, "maximum": 4},
        "size": {"type": "string", "pattern": "^(auto|[0-9]{1,5}x[0-9]{1,5})$"},
        "response_format": {"type": "string", "enum": ["b64_json"],
                            "description": "\"url\" is refused (400): no image store"},
        "output_format": {"type": "string", "enum": ["png"]},
        "seed": {"type": "integer", "minimum": 0, "maximum": _SEED_LIMIT,
                 "description": "extension: image i gets seed + i"},
        "negative_prompt": {"type": "string", "maxLength": _OPENAI_PROMPT_CHARS},
        "num_inference_steps": {"type": "integer", "minimum": 1, "maximum": 150},
        "guidance_scale": {"type": "number", "minimum": 1, "maximum": 20},
        "quality": string, "style": string, "user": string}}
    response = {"type": "object", "required": ["created", "data"], "properties": {
        "created": {"type": "integer"},
        "data": {"type": "array", "items": {"type": "object", "properties": {
            "b64_json": string, "seed": {"type": "integer"}}}},
        "usage": {"type": "object", "description": "output_tokens: the images' units "
                  "(units_per_image each), what a key's tokens per minute is charged",
                  "properties": {"input_tokens": {"type": "integer"},
                                 "output_tokens": {"type": "integer"},
                                 "total_tokens": {"type": "integer"}}}}}
    return {"/v1/images/generations": {"post": {
        "operationId": "images_generations", "summary": "Image generation (diffusion models)",
        "tags": ["openai"], "security": [{"bearer": []}, {"apiKey": []}, {}],
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": request}}},
        "parameters": [{"$ref": "#/components/parameters/RequestId"}],
        "responses": {"200": {"description": "base64 PNGs and their seeds",
                              "content": {"application/json": {"schema": response}}},
                      "4XX": error, "5XX": error}}}}
