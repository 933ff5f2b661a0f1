"""Seed 001, AI Inference Backend (../shared/seeds/001-ai-inference-backend.md).

    GET  /health        {"status", "models_loaded", "timestamp"} (503 until ready)
    GET  /models        {"models": [{"name", "version", "type", "model", "parameters",
                        "loaded"}]}: the three task models
    POST /infer         {"text", "model": "summarizer" | "sentiment" | "generator",
                        "version"? ("v1"), "parameters"?} -> the seed's response format
    POST /infer/batch   {"requests": [...]} -> {"success", "results": [...], ...}, each
                        item answered on its own (one bad item does not fail the rest)

A task is served by the repository model named after it when that is an LLM (e.g. a
`summarizer` model), else by the [compat] text_model / first ready LLM with the task's prompt.
Sentiment is constrained to one of "positive", "negative", "neutral" (a choice grammar), so
the label is the model's own pick, never parsed out of free text. The summarizer decodes
greedily, as the seed's BART did (deterministic), and its `min_length` is the output's floor in
tokens (min_tokens); the generator samples, as GPT-2's text-generation defaults do.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from daemon.errors import FerryError, InvalidInput, ModelNotFound
from frontends.http.admin import json_object
from frontends.http.appkeys import DISPATCHER
from frontends.http.compat import Route, utc_now
from frontends.http.compat.text import default_text_model, generate, sum_usage

__all__ = ["ROUTES", "error_body", "TASKS"]

_MAX_BATCH = 32
_LABELS = ["positive", "negative", "neutral"]


@dataclass(slots=True, frozen=True)
class Task:
    kind: str
    template: str                     # the prompt, with {text}
    parameters: tuple[str, ...]
    default_max: int
    structured: dict[str, Any] | None = None
    greedy: bool = False              # the seed's model decoded deterministically


TASKS = {
    "summarizer": Task("summarizer", "Summarize the following text in one sentence.\n\n"
                       "Text: {text}\n\nSummary:", ("max_length", "min_length"), 60,
                       greedy=True),
    "sentiment": Task("sentiment", "Is the sentiment of this text positive, negative or "
                      "neutral?\n\nText: {text}\n\nSentiment:", (), 4,
                      {"structured_outputs": {"choice": _LABELS}}),
    "generator": Task("generator", "{text}", ("max_length", "num_return_sequences"), 50),
}


def error_body(request: web.Request, exc: FerryError, ferry: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's `detail` beside Ferry's error object, and the seed's `success: false`."""
    return {"success": False, "detail": exc.message, **ferry}


def _model_for(request: web.Request, task: str) -> str:
    pl = request.app[DISPATCHER].placement
    m = (pl.models if pl is not None else {}).get(task)
    if m and any((e.get("info") or {}).get("kind") == "llm" and e.get("state") == "ready"
                 for e in m.get("versions", {}).values()):
        return task
    return default_text_model(request)


async def _infer_one(request: web.Request, item: Any, param: str) -> dict[str, Any]:
    started = time.monotonic()
    if not isinstance(item, dict):
        raise InvalidInput(f"{param} must be an object", code="invalid_parameter", param=param)
    text, name = item.get("text"), item.get("model", "summarizer")
    version = item.get("version", "v1")
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("'text' (a non-empty string) is required", code="missing_parameter",
                           param=f"{param}text")
    if not isinstance(name, str) or name not in TASKS:
        raise ModelNotFound(f"unknown model {name!r:.60}; expected one of {sorted(TASKS)}",
                            param=f"{param}model")
    if version != "v1":
        raise ModelNotFound(f"unknown version {version!r:.20} of {name}; expected 'v1'",
                            param=f"{param}version")
    task = TASKS[name]
    params = item.get("parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object",
                           code="invalid_parameter", param=f"{param}parameters")
    unknown = set(params) - set(task.parameters)
    if unknown:
        raise InvalidInput(f"{name} takes the parameters {list(task.parameters)}, not "
                           f"{sorted(unknown)}", code="unknown_parameter",
                           param=f"{param}parameters.{sorted(unknown)[0]}")
    max_length = params.get("max_length", task.default_max)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or \
            not 1 <= max_length <= 2**31 - 1:
        raise InvalidInput("'parameters.max_length' must be a positive integer",
                           code="invalid_parameter", param=f"{param}parameters.max_length")
    fields: dict[str, Any] = {"max_tokens": max_length}
    if "min_length" in params:      # BART's min_length: no end before that many tokens
        min_length = params["min_length"]
        if "max_length" not in params and isinstance(min_length, int):
            fields["max_tokens"] = max_length = max(max_length, min_length)   # the default's
        if not isinstance(min_length, int) or isinstance(min_length, bool) or \
                not 0 <= min_length <= max_length:
            raise InvalidInput("'parameters.min_length' must be an integer from 0 to max_length",
                               code="invalid_parameter", param=f"{param}parameters.min_length")
        fields["min_tokens"] = min_length
    if task.greedy:
        fields["temperature"] = 0.0
    if "num_return_sequences" in params and params["num_return_sequences"] != 1:
        raise InvalidInput("num_return_sequences must be 1 (one result per request)",
                           code="unsupported_parameter",
                           param=f"{param}parameters.num_return_sequences")
    if task.structured is not None:
        fields.update(task.structured)
        fields["temperature"] = 0.0
    model = _model_for(request, name)
    prompt = task.template.format(text=text) if model != name else text
    out = await generate(request, model, prompt, fields)
    if out is None:
        raise FerryError("the client went away", code="cancelled", status=499)
    result = out.text.strip()
    return {"success": True, "result": result, "model_used": f"{name}:v1",
            "latency_ms": round((time.monotonic() - started) * 1000.0, 2),
            "request_id": str(uuid.uuid4()), "timestamp": utc_now(),
            "metadata": {"model_type": name, "served_by": out.model,
                         "tokens_generated": out.completion_tokens,
                         "finish_reason": out.finish_reason}}


async def infer(request: web.Request) -> web.Response:
    return web.json_response(await _infer_one(request, await json_object(request), ""))


async def infer_batch(request: web.Request) -> web.Response:
    started = time.monotonic()
    body = await json_object(request)
    reqs = body.get("requests")
    if not isinstance(reqs, list) or not reqs:
        raise InvalidInput("'requests' must be a non-empty list",
                           code="invalid_parameter", param="requests")
    if len(reqs) > _MAX_BATCH:
        raise InvalidInput(f"at most {_MAX_BATCH} requests per batch",
                           code="invalid_parameter", param="requests")

    async def one(i: int, item: Any) -> dict[str, Any]:
        try:
            return await _infer_one(request, item, f"requests[{i}].")
        except FerryError as exc:
            if exc.status >= 500 or exc.status == 429:
                raise                     # the whole batch fails as one request would
            return {"success": False, "error": exc.message, "code": exc.code,
                    "param": exc.param, "timestamp": utc_now()}

    tasks = [asyncio.ensure_future(one(i, r)) for i, r in enumerate(reqs)]
    try:
        results = await asyncio.gather(*tasks)
    finally:        # an item that failed the batch (or a cancel) stops the rest, then counts
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sum_usage(request)
    ok = sum(1 for r in results if r["success"])
    return web.json_response({"success": ok == len(results), "results": results,
                              "total": len(results), "successful": ok,
                              "failed": len(results) - ok,
                              "latency_ms": round((time.monotonic() - started) * 1000.0, 2),
                              "request_id": str(uuid.uuid4()), "timestamp": utc_now()})


async def list_models(request: web.Request) -> web.Response:
    try:
        fallback: str | None = default_text_model(request)
    except FerryError:
        fallback = None
    out = []
    for name, task in TASKS.items():
        served = _model_for(request, name) if fallback is not None else None
        out.append({"name": name, "version": "v1", "type": task.kind, "model": served,
                    "parameters": list(task.parameters), "loaded": served is not None})
    return web.json_response({"models": out, "count": len(out)})


async def health(request: web.Request) -> web.Response:
    pl = request.app[DISPATCHER].placement
    ready = pl is not None and pl.state == "ready"
    loaded = sum(1 for m in (pl.models if pl is not None else {}).values()
                 if any(e.get("state") == "ready" for e in m.get("versions", {}).values()))
    return web.json_response({"status": "healthy" if ready else "unhealthy",
                              "models_loaded": loaded, "timestamp": utc_now()},
                             status=200 if ready else 503)


ROUTES = (
    Route("GET", "/health", health, "/health"),
    Route("GET", "/models", list_models),
    Route("POST", "/infer", infer),
    Route("POST", "/infer/batch", infer_batch),
)
