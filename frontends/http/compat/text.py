"""Text generation for the seeds' routes: one prompt through Ferry's own path (the OpenAI
completions parser for validation, the tokenizer cache, `textgen.Generation`), so the seeds'
fields get the same bounds, limits, token accounting and request-log usage as /v1/completions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from aiohttp import web

from daemon.errors import InvalidInput, ModelNotFound
from frontends.http.appkeys import DISPATCHER, request_key
from frontends.http.errors import request_id_of
from frontends.http.openai_schema import parse_completion
from frontends.http.security import authorize_model
from frontends.http.sse import until_disconnect
from frontends.http.textgen import (TEXTS, USAGE, Generation, Piece, TextModel, Usage,
                                    encode_prompts)

__all__ = ["TextResult", "default_text_model", "generate", "stream", "compat_setting",
           "sum_usage"]

# Every generation one request started (a seed batch runs several): the request's USAGE is
# their sum, so the key is charged and the request log counts every item, not the last one.
_PARTS = request_key("ferry_compat_usages", list)


@dataclass(slots=True)
class TextResult:
    model: str
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    elapsed_ms: float


def compat_setting(request: web.Request, key: str) -> str:
    """A [compat] setting as the supervisor last published it (hot-reloaded)."""
    pl = request.app[DISPATCHER].placement
    value = ((pl.config if pl is not None else {}).get("compat") or {}).get(key, "")
    return value if isinstance(value, str) else ""


def default_text_model(request: web.Request) -> str:
    """[compat] text_model, else the first ready LLM by name; ModelNotFound without one."""
    configured = compat_setting(request, "text_model")
    if configured:
        return configured
    pl = request.app[DISPATCHER].placement
    for name, m in sorted((pl.models if pl is not None else {}).items()):
        for entry in m.get("versions", {}).values():
            if entry.get("state") == "ready" and (entry.get("info") or {}).get("kind") == "llm":
                return name
    raise ModelNotFound("no text-generation model is loaded (set [compat] text_model)",
                        param="model")


async def _start(request: web.Request, model: str, prompt: str, fields: dict[str, Any]
                 ) -> tuple[TextModel, Generation, bool]:
    if not isinstance(prompt, str) or not prompt:
        raise InvalidInput("the prompt text must be a non-empty string", code="missing_parameter",
                           param="prompt")
    body = {**fields, "model": model, "prompt": prompt}
    req = parse_completion(body)           # Ferry's bounds and codes for every sampling field
    authorize_model(request, req.model)
    tm = await request.app[TEXTS].text_model(req.model)
    ids = await encode_prompts(tm, req.prompts)
    gen = await Generation.start(request.app[DISPATCHER], tm, ids, req.params,
                                 request_id=request_id_of(request))
    _track(request, gen.usage)             # charged to the key and logged by the security layer
    return tm, gen, req.params.stream


def _track(request: web.Request, usage: Usage) -> None:
    parts = request.get(_PARTS)
    if parts is None:                      # one generation: its live Usage (streams too)
        request[_PARTS] = [usage]
        request[USAGE] = usage
        return
    parts.append(usage)
    if len(parts) == 2:
        request[USAGE] = Usage()
    sum_usage(request)


def sum_usage(request: web.Request) -> None:
    """Bring the request's USAGE up to date with every generation it started (a no-op for one
    generation, whose Usage is the live one)."""
    parts = request.get(_PARTS)
    if parts is None or len(parts) < 2:
        return
    total = request[USAGE]
    total.prompt_tokens = sum(u.prompt_tokens for u in parts)
    total.completion_tokens = sum(u.completion_tokens for u in parts)
    total.cached_tokens = sum(u.cached_tokens for u in parts)


async def generate(request: web.Request, model: str, prompt: str,
                   fields: dict[str, Any]) -> TextResult | None:
    """The whole completion (None: the client went away and the generation was cancelled).
    `fields` are /v1/completions fields (max_tokens, temperature, top_p, stop, ...)."""
    started = time.monotonic()
    tm, gen, _ = await _start(request, model, prompt, {**fields, "stream": False})

    async def collect() -> tuple[str, str | None]:
        texts, finish = [], None
        async for p in gen.pieces():
            texts.append(p.text)
            finish = p.finish_reason or finish
        return "".join(texts), finish

    try:
        async with gen:
            out = await until_disconnect(request, collect())
    finally:
        sum_usage(request)
    if out is None:
        return None
    return TextResult(tm.name, out[0], out[1], gen.usage.prompt_tokens,
                      gen.usage.completion_tokens, (time.monotonic() - started) * 1000.0)


async def stream(request: web.Request, model: str, prompt: str,
                 fields: dict[str, Any]) -> tuple[TextModel, Generation, AsyncIterator[Piece]]:
    """A started generation and its pieces; the caller holds `async with gen`."""
    tm, gen, _ = await _start(request, model, prompt, {**fields, "stream": False})
    return tm, gen, gen.pieces()
