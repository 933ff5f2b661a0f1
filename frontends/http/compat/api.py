"""Seed 002, AI Inference API (../shared/seeds/002-ai-inference-api.md).

    GET  /, /v1                 what the API is, and where v1 lives (open)
    GET  /health, /v1/health    {"status", "device", "version"} (open; 503 until ready)
    GET  /v1/models             {"models": [{"id": SHA-256 of the weights, "name": the weights
                                file, "size", "path" (under the repository), "extension"}],
                                "count"}; at the root only with [compat] root = "api"
                                (OpenAI's /v1/models keeps its shape otherwise)
    GET  /v1/models/{model_id}  one of them, by SHA-256 id (or Ferry model name)
    POST /infer, /v1/infer      image generation by a diffusion model (frontends/http/images.py,
                                `seed002_infer`); with none loaded, the body is validated as the
                                seed documents it, then 400 `image_generation_unavailable`
                                (an unknown model_id: 404 model_not_found)

Errors add FastAPI's `detail` to Ferry's error object.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aiohttp import web

from daemon import __version__
from daemon.errors import FerryError, InvalidInput, ModelNotFound
from frontends.http.admin import json_object
from frontends.http.appkeys import DISPATCHER
from frontends.http.compat import Route
from frontends.http.security import authorize_model, principal_of
from frontends.http.textgen import model_toml

__all__ = ["ROUTES", "error_body"]

_NUMBERS = {"num_inference_steps": (int, 1, 150), "guidance_scale": (float, 1.0, 20.0),
            "width": (int, 256, 1024), "height": (int, 256, 1024), "num_images": (int, 1, 4),
            "seed": (int, 0, 2**32 - 1)}
_FIELDS = {"id", "model_id", "prompt", "negative_prompt", *_NUMBERS}


def error_body(request: web.Request, exc: FerryError, ferry: dict[str, Any]) -> dict[str, Any]:
    return {"detail": exc.message, **ferry}


async def root(request: web.Request) -> web.Response:
    return web.json_response({"name": "AI Inference API (Ferry)", "version": __version__,
                              "latest_version": "v1", "links": {"v1": "/v1",
                                                                "health": "/health"}})


async def v1(request: web.Request) -> web.Response:
    return web.json_response({"version": "v1", "endpoints": [
        "/v1/health", "/v1/models", "/v1/models/{model_id}", "/v1/infer"]})


async def health(request: web.Request) -> web.Response:
    pl = request.app[DISPATCHER].placement
    ready = pl is not None and pl.state == "ready"
    devices = sorted({str(e.get("device", "cpu")) for e in
                      (pl.engines if pl is not None else {}).values()})
    device = "cuda" if any(d.startswith("cuda") for d in devices) else "cpu"
    return web.json_response({"status": "healthy" if ready else "unhealthy", "device": device,
                              "devices": devices, "version": __version__},
                             status=200 if ready else 503)


def _record(repo: Path | None, name: str, entry: dict[str, Any]) -> dict[str, Any] | None:
    path = Path(entry.get("path", ""))
    try:
        weights = model_toml(path).get("weights")
    except FerryError:
        return None
    try:
        files = [path / weights] if isinstance(weights, str) and weights else \
            sorted(p for p in path.iterdir() if p.name != "model.toml")   # a dir: a pipeline
        f = files[0] if files else None
        size = _size(f) if f is not None else None
    except OSError:          # the version directory went away under the scan
        return None
    if f is None or size is None:
        return None
    try:
        rel = str(f.relative_to(repo)) if repo is not None else str(f)
    except ValueError:
        rel = os.path.join(name, path.name, f.name)
    return {"id": entry.get("sha256"), "name": f.name, "size": size, "path": rel,
            "extension": f.suffix, "model": name}


def _size(f: Path) -> int | None:
    """A weights file's size; a weights directory (a diffusers pipeline) is the sum of its
    files."""
    if f.is_file():
        return f.stat().st_size
    if f.is_dir():
        return sum(p.stat().st_size for p in f.rglob("*") if p.is_file())
    return None


def _repo(entries: list[dict[str, Any]]) -> Path | None:
    """The repository root: two levels above a version directory (<repo>/<name>/<version>)."""
    for entry in entries:
        if entry.get("path"):
            return Path(entry["path"]).parent.parent
    return None


def _models(request: web.Request) -> list[dict[str, Any]]:
    pl = request.app[DISPATCHER].placement
    principal = principal_of(request)
    found = []
    for name, m in sorted((pl.models if pl is not None else {}).items()):
        if principal is not None and not principal.may_use(name):
            continue
        for _, entry in sorted(m.get("versions", {}).items(), key=lambda kv: int(kv[0])):
            if entry.get("state") == "ready" and entry.get("sha256"):
                found.append((name, entry))
    repo = _repo([e for _, e in found])
    records = [_record(repo, n, e) for n, e in found]
    return [r for r in records if r is not None]


async def list_models(request: web.Request) -> web.Response:
    models = _models(request)
    return web.json_response({"models": models, "count": len(models)})


async def get_model(request: web.Request) -> web.Response:
    wanted = request.match_info["model"]
    for record in _models(request):
        if wanted in (record["id"], record["model"]):
            return web.json_response(record)
    raise ModelNotFound(f"model {wanted!r:.80} not found", param="model_id")


def _image_models(request: web.Request) -> bool:
    """Whether a diffusion model is ready (frontends/http/images.py serves it)."""
    try:
        from frontends.http.images import PLATFORM
    except ModuleNotFoundError:
        return False
    pl = request.app[DISPATCHER].placement
    return any((e.get("info") or {}).get("platform") == PLATFORM and e.get("state") == "ready"
               for m in (pl.models.values() if pl is not None else ())
               for e in m.get("versions", {}).values())


async def infer(request: web.Request) -> web.StreamResponse:
    if _image_models(request):
        from frontends.http.images import seed002_infer
        return await seed002_infer(request)
    body = await json_object(request)
    unknown = set(body) - _FIELDS
    if unknown:
        raise InvalidInput(f"unknown field(s) {sorted(unknown)}", code="unknown_parameter",
                           param=sorted(unknown)[0])
    for key in ("id", "model_id", "prompt"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise InvalidInput(f"'{key}' (a non-empty string) is required",
                               code="missing_parameter", param=key)
    if len(body["prompt"]) > 1000:
        raise InvalidInput("'prompt' is at most 1000 characters",
                           code="invalid_parameter", param="prompt")
    if body.get("negative_prompt") is not None and not isinstance(body["negative_prompt"], str):
        raise InvalidInput("'negative_prompt' must be a string",
                           code="invalid_parameter", param="negative_prompt")
    for key, (kind, lo, hi) in _NUMBERS.items():
        value = body.get(key)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            (kind is float or isinstance(value, int)) and lo <= value <= hi
        if not ok:
            raise InvalidInput(f"'{key}' must be {'an integer' if kind is int else 'a number'}"
                               f" in [{lo}, {hi}]", code="invalid_parameter", param=key)
    model_id = body["model_id"]
    authorize_model(request, model_id)
    if not any(model_id in (r["id"], r["model"]) for r in _models(request)):
        raise ModelNotFound(f"model {model_id!r:.80} not found", param="model_id")
    raise InvalidInput("image generation needs a diffusion engine, which this Ferry build does "
                       "not have; the request is valid and was not run",
                       code="image_generation_unavailable", param="model_id")


ROUTES = (
    Route("GET", "/", root, "/healthz"),
    Route("GET", "/v1", v1, "/healthz"),
    Route("GET", "/health", health, "/health"),
    Route("GET", "/v1/health", health, "/health"),
    Route("GET", "/v1/models", list_models, "/v1/models"),
    Route("GET", "/v1/models/{model}", get_model, "/v1/models/{model}"),
    Route("POST", "/infer", infer),
    Route("POST", "/v1/infer", infer),
)
