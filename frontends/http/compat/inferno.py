"""Seed 004, Inferno (../shared/seeds/004-inferno-api.md): its REST routes and /ws.

    POST /inference            one completion: {"id", "model", "choices": [{"text", "index",
                               "finish_reason"}], "usage", "created", "processing_time_ms"}
    POST /inference/stream     SSE: data: {"token", "index"} ... data: {"done": true,
                               "finish_reason"} (also /inference with "stream": true)
    POST /embeddings           /v1/embeddings (the same body)
    POST /batch, GET /batch/{id}, GET /batch/{id}/results   Ferry batch jobs (/v1/batches)
    GET  /models               {"models": [{"id", "name", "type", "size_bytes", "loaded",
                               "context_size", "capabilities"}]}
    POST /models/{id}/load | unload   the repository's load/unload (admin scope, as Ferry's)
    GET  /health               {"status", "version", "uptime_seconds", "models_loaded"}
    GET  /ws                   the /v1/ws protocol (auth, inference, cancel, ping)

Errors: {"error": {"code": "MODEL_NOT_FOUND", "message", "details"}, "request_id",
"timestamp"}, Inferno's codes (Ferry's stable code in details.ferry_code); a 429 carries
`retry_after` and the X-RateLimit-* headers.
"""
from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from pathlib import Path
from typing import Any, cast

from aiohttp import web

from daemon import __version__
from frontends.http.batch_runner import OWNER
from daemon.errors import FerryError, InvalidInput, ModelNotFound
from frontends.http import batches, openai, ws
from frontends.http.admin import json_object
from frontends.http.appkeys import DISPATCHER
from frontends.http.compat import Route, utc_now
from frontends.http.compat.text import generate, stream
from frontends.http.errors import request_id_of
from frontends.http.security import ACCESS, authorize_model, principal_of

__all__ = ["ROUTES", "error_body"]

_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "repeat_penalty",
           "stop", "stream", "seed", "min_p"}
_BY_CODE = {"model_not_found": "MODEL_NOT_FOUND", "model_unavailable": "MODEL_NOT_LOADED",
            "model_not_ready": "MODEL_NOT_LOADED",
            "context_length_exceeded": "CONTEXT_LENGTH_EXCEEDED"}
_BY_STATUS = {401: "AUTHENTICATION_FAILED", 403: "AUTHORIZATION_FAILED", 404: "MODEL_NOT_FOUND",
              429: "RATE_LIMIT_EXCEEDED", 504: "TIMEOUT", 500: "INTERNAL_ERROR"}
_STARTED = time.time()


def error_body(request: web.Request, exc: FerryError, ferry: dict[str, Any]) -> dict[str, Any]:
    code = _BY_CODE.get(exc.code) or _BY_STATUS.get(exc.status) or \
        ("INVALID_REQUEST" if exc.status < 500 else "INFERENCE_FAILED")
    if exc.status == 404 and exc.code not in ("model_not_found",) and "model" not in exc.code:
        code = "INVALID_REQUEST"            # an unknown batch or route is not a model
    details: dict[str, Any] = {"ferry_code": exc.code}
    if exc.param is not None:
        details["param"] = exc.param
    if code == "MODEL_NOT_FOUND":
        details["available_models"] = _ready_models(request)
    rid = ferry["error"]["request_id"]
    err: dict[str, Any] = {"code": code, "message": exc.message, "details": details,
                           "request_id": rid}
    if exc.status == 429:
        err["retry_after"] = int(getattr(exc, "retry_after", 1) + 0.999)
    return {"error": err, "request_id": rid, "timestamp": utc_now()}


def _ready_models(request: web.Request) -> list[str]:
    pl = request.app[DISPATCHER].placement
    principal = principal_of(request)
    return sorted(n for n, m in (pl.models if pl is not None else {}).items()
                  if any(e.get("state") == "ready" for e in m.get("versions", {}).values())
                  and (principal is None or principal.may_use(n)))


# -- inference ----------------------------------------------------------------------------------

async def _body(request: web.Request) -> tuple[str, str, dict[str, Any]]:
    body = await json_object(request)
    unknown = set(body) - _FIELDS
    if unknown:
        raise InvalidInput(f"unknown field(s) {sorted(unknown)}", code="unknown_parameter",
                           param=sorted(unknown)[0])
    model, prompt = body.get("model"), body.get("prompt")
    if not isinstance(model, str) or not model:
        raise InvalidInput("'model' (a string) is required", code="missing_parameter",
                           param="model")
    if not isinstance(prompt, str) or not prompt:
        raise InvalidInput("'prompt' (a non-empty string) is required",
                           code="missing_parameter", param="prompt")
    fields = {k: body[k] for k in ("max_tokens", "temperature", "top_p", "top_k", "stop",
                                   "seed", "min_p") if body.get(k) is not None}
    if body.get("repeat_penalty") is not None:
        fields["repetition_penalty"] = body["repeat_penalty"]
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise InvalidInput("'stream' must be a boolean", code="invalid_parameter", param="stream")
    fields["_stream"] = bool(body.get("stream"))
    return model, prompt, fields


async def inference(request: web.Request) -> web.StreamResponse:
    model, prompt, fields = await _body(request)
    if fields.pop("_stream"):
        return await _stream(request, model, prompt, fields)
    out = await generate(request, model, prompt, fields)
    if out is None:
        return web.Response(status=499)
    return web.json_response({
        "id": "inf_" + uuid.uuid4().hex[:12], "model": out.model,
        "choices": [{"text": out.text, "index": 0, "finish_reason": out.finish_reason}],
        "usage": {"prompt_tokens": out.prompt_tokens,
                  "completion_tokens": out.completion_tokens,
                  "total_tokens": out.prompt_tokens + out.completion_tokens},
        "created": int(time.time()), "processing_time_ms": int(out.elapsed_ms)})


async def inference_stream(request: web.Request) -> web.StreamResponse:
    model, prompt, fields = await _body(request)
    fields.pop("_stream")
    return await _stream(request, model, prompt, fields)


async def _stream(request: web.Request, model: str, prompt: str,
                  fields: dict[str, Any]) -> web.StreamResponse:
    tm, gen, pieces = await stream(request, model, prompt, fields)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                       "X-Request-ID": request_id_of(request)})
    async with gen:
        await resp.prepare(request)
        index = 0
        try:
            async for p in pieces:
                if p.text:
                    await _event(resp, {"token": p.text, "index": index})
                    index += 1
                if p.finish_reason is not None:
                    await _event(resp, {"done": True, "finish_reason": p.finish_reason})
        except FerryError as exc:      # after the head: the error rides as the last event
            await _event(resp, {"error": {"code": "INFERENCE_FAILED", "message": exc.message,
                                          "details": {"ferry_code": exc.code}}})
        except ConnectionResetError:
            return resp
    await resp.write_eof()
    return resp


async def _event(resp: web.StreamResponse, obj: dict[str, Any]) -> None:
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    await resp.write(b"data: " + data.encode() + b"\n\n")


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await openai.embeddings(request)        # the same body and a superset reply


# -- batches ------------------------------------------------------------------------------------

async def create_batch(request: web.Request) -> web.Response:
    body = await json_object(request)
    model, reqs = body.get("model"), body.get("requests")
    if not isinstance(model, str) or not model:
        raise InvalidInput("'model' (a string) is required", code="missing_parameter",
                           param="model")
    if not isinstance(reqs, list) or not reqs:
        raise InvalidInput("'requests' must be a non-empty list",
                           code="invalid_parameter", param="requests")
    max_tokens = body.get("max_tokens")
    items = []
    for i, r in enumerate(reqs):
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not r["prompt"]:
            raise InvalidInput(f"requests[{i}] needs a 'prompt' string",
                               code="missing_parameter", param=f"requests[{i}].prompt")
        item_body = {"model": model, "prompt": r["prompt"]}
        if max_tokens is not None:
            item_body["max_tokens"] = max_tokens
        item: dict[str, Any] = {"url": "/v1/completions", "body": item_body}
        if r.get("id") is not None:
            item["custom_id"] = r["id"]
        items.append(item)
    authorize_model(request, model)
    url = body.get("webhook_url")
    access = request.app.get(ACCESS)
    if access is None:
        raise FerryError("the state database is not open", code="security_unavailable",
                         status=503)
    if url is not None:
        if not isinstance(url, str):
            raise InvalidInput("'webhook_url' must be a string",
                               code="invalid_parameter", param="webhook_url")
        await access.egress.check_url(url)
    principal = principal_of(request)
    secret = secrets.token_urlsafe(32) if url is not None else None
    job = await access.state.batches.create(
        "/v1/completions", items, model=model, webhook_url=url, webhook_secret=secret,
        metadata={OWNER: principal.id if principal is not None else None})
    runner = request.app.get(batches.RUNNER)
    if runner is not None:
        runner.wake()
    out: dict[str, Any] = {"batch_id": job.id, "status": "processing",
                           "total_requests": job.total, "created": int(job.created_at)}
    if secret is not None:
        out["webhook_secret"] = secret      # shown once, as /v1/batches does: signatures use it
    return web.json_response(out)


_BATCH_STATUS = {"validating": "processing", "in_progress": "processing",
                 "completed": "completed", "failed": "failed", "cancelled": "cancelled",
                 "cancelling": "processing", "expired": "failed"}


async def get_batch(request: web.Request) -> web.Response:
    resp = cast(web.Response, await batches.get_batch(request))
    ferry = json.loads(resp.text or "{}")
    counts = ferry["request_counts"]
    return web.json_response({
        "batch_id": ferry["id"], "status": _BATCH_STATUS.get(ferry["status"], ferry["status"]),
        "completed": counts["completed"], "failed": counts["failed"], "total": counts["total"],
        "results_url": f"{_base(request)}/batch/{ferry['id']}/results"})


def _base(request: web.Request) -> str:
    return "/compat/inferno" if request.path.startswith("/compat/inferno/") else ""


async def batch_results(request: web.Request) -> web.StreamResponse:
    return await batches.batch_results(request)


# -- models -------------------------------------------------------------------------------------

def _size(path: str) -> int:
    root = Path(path)
    try:
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    except OSError:
        return 0


async def list_models(request: web.Request) -> web.Response:
    pl = request.app[DISPATCHER].placement
    principal = principal_of(request)
    out = []
    for name, m in sorted((pl.models if pl is not None else {}).items()):
        if principal is not None and not principal.may_use(name):
            continue
        versions = m.get("versions", {})
        if not versions:
            continue
        ready = [v for v, e in versions.items() if e.get("state") == "ready"]
        version = max(ready or list(versions), key=int)
        entry = versions[version]
        info = entry.get("info") or {}
        kind = info.get("kind", "tensor")
        extra = info.get("extra") or {}
        caps = ["text-generation"] if kind == "llm" else ["inference"]
        out.append({"id": name, "name": name, "type": entry.get("engine") or kind,
                    "size_bytes": _size(entry.get("path", "")), "loaded": bool(ready),
                    "context_size": extra.get("context_length"), "capabilities": caps,
                    "version": int(version)})
    return web.json_response({"models": out})


async def load_model(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    raw = await request.read()
    body = await json_object(request) if raw.strip() else {}
    for key in ("gpu_layers", "context_size", "batch_size"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 0):
            raise InvalidInput(f"'{key}' must be a non-negative integer",
                               code="invalid_parameter", param=key)
    started = time.monotonic()
    d = request.app[DISPATCHER]
    await d.control("load", {"model": model})
    elapsed = int((time.monotonic() - started) * 1000)
    try:
        _, _, entry = _entry(request, model)
        size = _size(entry.get("path", ""))
    except ModelNotFound:
        size = 0
    return web.json_response({"status": "loaded", "model_id": model,
                              "memory_usage_bytes": size, "load_time_ms": elapsed})


def _entry(request: web.Request, model: str) -> tuple[str, int, dict[str, Any]]:
    from frontends.http.textgen import resolve_model
    return resolve_model(request.app[DISPATCHER], model)


async def unload_model(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    await request.read()
    await request.app[DISPATCHER].control("unload", {"model": model})
    return web.json_response({"status": "unloaded", "model_id": model})


async def health(request: web.Request) -> web.Response:
    pl = request.app[DISPATCHER].placement
    ready = pl is not None and pl.state == "ready"
    loaded = sum(1 for m in (pl.models if pl is not None else {}).values()
                 if any(e.get("state") == "ready" for e in m.get("versions", {}).values()))
    return web.json_response({"status": "healthy" if ready else "unhealthy",
                              "version": __version__, "uptime_seconds": _uptime(),
                              "models_loaded": loaded}, status=200 if ready else 503)


def _uptime() -> int:
    try:
        import psutil
        started = psutil.Process(os.getppid()).create_time()
    except Exception:   # psutil.Error: the supervisor is not ours to read
        started = _STARTED
    return max(0, int(time.time() - started))


ROUTES = (
    Route("POST", "/inference", inference, "/v1/completions"),     # body "model" checked, logged
    Route("POST", "/inference/stream", inference_stream, "/v1/completions"),
    Route("POST", "/embeddings", embeddings, "/v1/embeddings"),
    Route("POST", "/batch", create_batch, "/v1/batches"),
    Route("GET", "/batch/{batch_id}", get_batch, "/v1/batches/{batch_id}"),
    Route("GET", "/batch/{batch_id}/results", batch_results, "/v1/batches/{batch_id}/results"),
    Route("GET", "/models", list_models),
    Route("POST", "/models/{model}/load", load_model, "/v2/repository/models/{model}/load"),
    Route("POST", "/models/{model}/unload", unload_model,
          "/v2/repository/models/{model}/unload"),
    Route("GET", "/health", health, "/health"),
    Route("GET", "/ws", ws.websocket, "/v1/ws"),
)
