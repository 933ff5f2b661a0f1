"""vLLM's `/tokenize` and `/detokenize`, with vLLM's request and response shapes.

    POST /tokenize    {"model"?, "prompt", "add_special_tokens": true, "return_token_strs"}
                      {"model"?, "messages", "add_generation_prompt": true,
                       "add_special_tokens": false, "return_token_strs"}
                   →  {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize  {"model"?, "tokens"}  →  {"prompt"}

Chat messages are rendered with the chat template the chat route uses, so `count` is the
`prompt_tokens` a chat completion of the same messages reports. `model` may be left out while
the daemon serves exactly one LLM, as a single-model vLLM server allows. vLLM options Ferry does
not serve (`continue_final_message`, a per-request `chat_template`, `tools`) are refused with
400 `unsupported_parameter` rather than ignored.
"""
from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from daemon.errors import InvalidInput
from frontends.http.appkeys import DISPATCHER
from frontends.http.openai import read_json
from frontends.http.openai_schema import parse_chat, require_object
from frontends.http.security import authorize_model
from frontends.http.textgen import TEXTS, TextModel

__all__ = ["routes"]

routes = web.RouteTableDef()
_INLINE_TOKENS = 4096       # longer id lists are decoded in a thread


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInput(f"'{key}' must be a boolean", code="invalid_parameter", param=key)
    return value


def _refuse_set(body: dict[str, Any], key: str, neutral: tuple[Any, ...], why: str) -> None:
    if body.get(key) not in neutral:
        raise InvalidInput(f"'{key}' is not supported by this server: {why}",
                           code="unsupported_parameter", param=key)


def _model_name(request: web.Request, body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        pl = request.app[DISPATCHER].placement
        llms = sorted(name for name, m in (pl.models if pl is not None else {}).items()
                      if any(v.get("state") == "ready" and v.get("info", {}).get("kind") == "llm"
                             for v in m.get("versions", {}).values()))
        if len(llms) != 1:
            raise InvalidInput(f"'model' is required: this daemon serves {len(llms)} language "
                               "models", code="missing_parameter", param="model")
        model = llms[0]
    if not isinstance(model, str) or not model:
        raise InvalidInput("'model' must be a non-empty string", code="invalid_parameter",
                           param="model")
    authorize_model(request, model)
    return model


async def _text_model(request: web.Request) -> tuple[TextModel, dict[str, Any]]:
    body = require_object(await read_json(request))
    model = _model_name(request, body)
    return await request.app[TEXTS].text_model(model), body


async def _chat_ids(tm: TextModel, body: dict[str, Any]) -> list[int]:
    _refuse_set(body, "continue_final_message", (None, False), "the final message is not "
                "continued")
    _refuse_set(body, "chat_template", (None,), "the model's template (or model.toml's "
                "[llm] chat_template) is used")
    _refuse_set(body, "tools", (None, []), "no tool calling")
    messages = parse_chat({"model": tm.name, "messages": body["messages"]}).messages
    if _flag(body, "add_generation_prompt", True) or \
            (tm.template is None and not tm.tokenizer.chat_template):
        text = tm.render_chat(messages)                 # (refuses a model without a template)
    else:
        text = tm.tokenizer.apply_chat_template(messages, add_generation_prompt=False,
                                                template=tm.template)
    return await tm.encode(text, add_special_tokens=_flag(body, "add_special_tokens", False),
                           param="messages")


@routes.post("/tokenize")
async def tokenize(request: web.Request) -> web.Response:
    tm, body = await _text_model(request)
    if ("prompt" in body) == ("messages" in body):
        raise InvalidInput("give either 'prompt' (a string) or 'messages' (a chat)",
                           code="missing_parameter" if "prompt" not in body else
                           "invalid_parameter", param="prompt")
    if "messages" in body:
        ids = await _chat_ids(tm, body)
    else:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise InvalidInput("'prompt' must be a string", code="invalid_parameter",
                               param="prompt")
        ids = await tm.encode(prompt, add_special_tokens=_flag(body, "add_special_tokens", True))
    strs = [tm.tokenizer.token_text(t) for t in ids] \
        if _flag(body, "return_token_strs", False) else None
    return web.json_response({"count": len(ids), "max_model_len": tm.context_length,
                              "tokens": ids, "token_strs": strs})


@routes.post("/detokenize")
async def detokenize(request: web.Request) -> web.Response:
    tm, body = await _text_model(request)
    tokens = body.get("tokens")
    if tokens is None:
        raise InvalidInput("'tokens' is required", code="missing_parameter", param="tokens")
    if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise InvalidInput("'tokens' must be a list of token ids", code="invalid_parameter",
                           param="tokens")
    bad = [t for t in tokens if not 0 <= t < tm.vocab_size]
    if bad:
        raise InvalidInput(f"token id {bad[0]} is outside the vocabulary [0, {tm.vocab_size})",
                           code="invalid_parameter", param="tokens")
    if len(tokens) <= _INLINE_TOKENS:
        text = tm.tokenizer.decode(tokens, skip_special_tokens=False)
    else:                       # a body's worth of ids takes long enough to stall the loop
        text = await asyncio.to_thread(tm.tokenizer.decode, tokens, skip_special_tokens=False)
    return web.json_response({"prompt": text})
