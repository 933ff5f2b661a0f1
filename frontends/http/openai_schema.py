"""Validation of OpenAI-style request bodies into typed records, with errors that name the field.

Every bad field raises `InvalidInput` whose `param` is the path of the field as OpenAI writes it
(`messages[1].content`, `stop`, `n`), with a stable code:

- `missing_parameter`: a required field is absent;
- `invalid_parameter`: a field has the wrong type or is out of range;
- `unsupported_parameter`: a field OpenAI defines but Ferry does not serve (logit_bias,
  top_logprobs > 0, ...) was set to something other than its neutral value. Failing loudly beats
  silently answering a different question than the one asked.

Fields nobody defines are ignored, as vLLM and llama.cpp do, so clients that send extra keys keep
working. The same parsers serve the WebSocket protocol (frontends/http/ws.py). Output constraints
(`response_format`, vLLM's `structured_outputs` and `guided_*`) are read by
frontends/http/structured.py, `tools` and `tool_choice` by frontends/http/tools.py (only where
the caller serves them: `parse_chat(..., allow_tools=True)`; elsewhere they are
`unsupported_parameter`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from daemon.errors import InvalidInput
from frontends.http.structured import parse_structured
from frontends.http.tools import ToolRequest, parse_tools, read_tool_calls

log = logging.getLogger(__name__)

__all__ = [
    "MAX_N", "MAX_STOPS", "MAX_PROMPTS", "MAX_EMBED_INPUTS", "GenParams", "ChatRequest",
    "CompletionRequest", "EmbeddingRequest", "parse_chat", "parse_completion",
    "parse_embeddings", "require_object",
]

MAX_N = 8                   # choices per prompt
MAX_STOPS = 4               # as OpenAI
MAX_STOP_CHARS = 256
MAX_PROMPTS = 32            # prompts in one /v1/completions batch
MAX_EMBED_INPUTS = 2048     # as OpenAI
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_SEED_RANGE = (-(2**63), 2**64)


@dataclass(slots=True)
class GenParams:
    """Sampling and output controls shared by chat and completions."""

    max_tokens: int | None = None        # None: up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0                  # eos / stop_token_ids cannot end the output earlier
    deterministic: bool = False          # tokens independent of batch company and cache state
    logprobs: bool = False
    top_logprobs: int = 0                # alternatives per token, with logprobs
    stream: bool = False
    include_usage: bool = False
    resumable: bool = False              # stream_options.resumable (frontends/http/resume.py)
    user: str | None = None
    structured: dict[str, Any] | None = None   # an output constraint (frontends/http/structured)

    def engine_params(self, max_tokens: int, choice: int) -> dict[str, Any]:
        """The engine's sampling dict (engines.llm.sampling.SamplingParams fields) for one
        choice. Seeded requests give choice i the seed + i, so n > 1 choices differ but each
        stays reproducible."""
        seed = None if self.seed is None else (self.seed + choice) % (2**63)
        return {"max_tokens": max_tokens, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "min_p": self.min_p,
                "repetition_penalty": self.repetition_penalty,
                "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty,
                "stop_token_ids": list(self.stop_token_ids), "ignore_eos": self.ignore_eos,
                "min_tokens": min(self.min_tokens, max_tokens),
                "deterministic": self.deterministic, "seed": seed, "logprobs": self.logprobs, "top_logprobs": self.top_logprobs,
                "structured": self.structured}


@dataclass(slots=True)
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]       # [{"role", "content"}], content flattened to text;
    params: GenParams                    # assistant "tool_calls", tool "tool_call_id" as given
    tools: ToolRequest | None = None     # None: no tools offered, or tool_choice "none"


@dataclass(slots=True)
class CompletionRequest:
    model: str
    prompts: list[str | list[int]]       # text, or token ids as given
    params: GenParams
    echo: bool = False


@dataclass(slots=True)
class EmbeddingRequest:
    model: str
    inputs: list[str | list[int]]
    encoding_format: str = "float"       # "float" | "base64"
    dimensions: int | None = None        # checked against the model's width by the route
    user: str | None = None


# -- field readers -----------------------------------------------------------------------------

def _bad(param: str, why: str, code: str = "invalid_parameter") -> InvalidInput:
    return InvalidInput(f"'{param}' {why}", code=code, param=param)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object", code="invalid_json")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise _bad("model", "is required", "missing_parameter")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise _bad("model", "must be a non-empty string of at most 256 characters")
    return model


def _int(body: dict[str, Any], key: str, lo: int, hi: int, default: Any) -> Any:
    v = body.get(key)
    if v is None:
        return default
    if not _is_int(v) or not lo <= v <= hi:
        raise _bad(key, f"must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _num(body: dict[str, Any], key: str, lo: float, hi: float, default: float, *,
         open_lo: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not _is_num(v) or v > hi or v < lo or (open_lo and v == lo):
        interval = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"
        raise _bad(key, f"must be a number in {interval}, got {v!r}")
    return float(v)


def _bool(body: dict[str, Any], key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(key, f"must be a boolean, got {v!r}")
    return v


def _optional_str(body: dict[str, Any], key: str, max_len: int = 256) -> str | None:
    v = body.get(key)
    if v is not None and (not isinstance(v, str) or len(v) > max_len):
        raise _bad(key, f"must be a string of at most {max_len} characters")
    return v


def _unsupported(body: dict[str, Any], key: str, neutral: tuple[Any, ...], why: str) -> None:
    v = body.get(key)
    if v is not None and v not in neutral:
        raise _bad(key, f"is not supported by this server: {why}", "unsupported_parameter")


def _stop(body: dict[str, Any]) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "must be a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise _bad("stop", f"holds {len(stops)} sequences; at most {MAX_STOPS} are allowed")
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise _bad("stop", f"sequences must be 1 to {MAX_STOP_CHARS} characters long")
    return list(dict.fromkeys(stops))


def _token_list(v: Any, param: str) -> list[int]:
    if not isinstance(v, list) or not all(_is_int(t) and 0 <= t < 2**31 for t in v):
        raise _bad(param, "must be a list of non-negative integer token ids")
    return v


def _gen_params(body: dict[str, Any], *, chat: bool) -> GenParams:
    p = GenParams()
    max_tokens = body.get("max_completion_tokens") if chat else None
    key = "max_completion_tokens" if max_tokens is not None else "max_tokens"
    p.max_tokens = _int(body, key, 1, 2**31 - 1, None)
    p.temperature = _num(body, "temperature", 0.0, 2.0, 1.0)
    p.top_p = _num(body, "top_p", 0.0, 1.0, 1.0, open_lo=True)
    p.top_k = _int(body, "top_k", -1, 2**31 - 1, -1)
    p.min_p = _num(body, "min_p", 0.0, 1.0, 0.0)
    p.repetition_penalty = _num(body, "repetition_penalty", 0.0, 10.0, 1.0, open_lo=True)
    p.presence_penalty = _num(body, "presence_penalty", -2.0, 2.0, 0.0)
    p.frequency_penalty = _num(body, "frequency_penalty", -2.0, 2.0, 0.0)
    p.seed = _int(body, "seed", _SEED_RANGE[0], _SEED_RANGE[1] - 1, None)
    p.n = _int(body, "n", 1, MAX_N, 1)
    p.stop = _stop(body)
    if body.get("stop_token_ids") is not None:
        p.stop_token_ids = _token_list(body["stop_token_ids"], "stop_token_ids")
    p.ignore_eos = _bool(body, "ignore_eos")
    p.min_tokens = _int(body, "min_tokens", 0, 2**31 - 1, 0)
    if p.max_tokens is not None and p.min_tokens > p.max_tokens:
        raise _bad("min_tokens", f"must be at most {key} ({p.max_tokens})")
    p.deterministic = _bool(body, "deterministic")
    p.stream = _bool(body, "stream")
    p.user = _optional_str(body, "user")
    p.structured = parse_structured(body)
    _stream_options(body, p)
    _unsupported(body, "logit_bias", ({},), "logit bias is not implemented")
    best_of = body.get("best_of")
    if best_of is not None and best_of != p.n:
        raise _bad("best_of", "is not supported by this server (only best_of == n)",
                   "unsupported_parameter")
    return p


def _stream_options(body: dict[str, Any], p: GenParams) -> None:
    opts = body.get("stream_options")
    if opts is None:
        return
    if not isinstance(opts, dict):
        raise _bad("stream_options", "must be an object")
    if not p.stream:
        raise _bad("stream_options", "is only allowed when 'stream' is true")
    usage = opts.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise _bad("stream_options.include_usage", "must be a boolean")
    p.include_usage = bool(usage)
    resumable = opts.get("resumable")
    if resumable is not None and not isinstance(resumable, bool):
        raise _bad("stream_options.resumable", "must be a boolean")
    p.resumable = bool(resumable)


# -- chat ------------------------------------------------------------------------------------

def _content(v: Any, param: str, role: str) -> str:
    if isinstance(v, str):
        return v
    if v is None and role == "assistant":
        return ""
    if not isinstance(v, list):
        raise _bad(param, "must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(v):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise _bad(where, "must be an object such as {\"type\": \"text\", \"text\": \"...\"}")
        kind = part.get("type")
        if kind != "text":
            if kind in ("image_url", "input_audio", "file", "refusal"):
                raise _bad(f"{where}.type", f"{kind!r} content is not supported by this model "
                           "server; send text parts", "unsupported_parameter")
            raise _bad(f"{where}.type", f"must be 'text', got {kind!r}")
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad(f"{where}.text", "must be a string")
        texts.append(text)
    # Adjacent text parts are one message; OpenAI joins them without a separator too.
    return "".join(texts)


def _message(m: Any, where: str, allow_tools: bool) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise _bad(where, "must be an object with 'role' and 'content'")
    role = m.get("role")
    if role is None:
        raise _bad(f"{where}.role", "is required", "missing_parameter")
    if role == "tool" and allow_tools:
        call_id = m.get("tool_call_id")
        if call_id is None:
            raise _bad(f"{where}.tool_call_id", "is required", "missing_parameter")
        if not isinstance(call_id, str) or not call_id:
            raise _bad(f"{where}.tool_call_id", "must be a non-empty string")
        if "content" not in m:
            raise _bad(f"{where}.content", "is required", "missing_parameter")
        return {"role": "tool", "tool_call_id": call_id,
                "content": _content(m.get("content"), f"{where}.content", role)}
    if not isinstance(role, str) or role not in _ROLES:     # a list is unhashable
        if role in ("tool", "function"):
            raise _bad(f"{where}.role", f"{role!r} messages are not supported here (no tool "
                       "calling)", "unsupported_parameter")
        raise _bad(f"{where}.role", "must be one of 'system', 'developer', 'user', "
                   f"'assistant'{', ' + repr('tool') if allow_tools else ''}, got {role!r}")
    if "content" not in m and role != "assistant":
        raise _bad(f"{where}.content", "is required", "missing_parameter")
    out: dict[str, Any] = {"role": _ROLES[role],
                           "content": _content(m.get("content"), f"{where}.content", role)}
    if m.get("tool_calls"):
        if not allow_tools or role != "assistant":
            raise _bad(f"{where}.tool_calls", "are not supported here (no tool calling)"
                       if not allow_tools else "belong to assistant messages",
                       "unsupported_parameter" if not allow_tools else "invalid_parameter")
        out["tool_calls"] = read_tool_calls(m["tool_calls"], f"{where}.tool_calls")
    return out


def _messages(body: dict[str, Any], allow_tools: bool) -> list[dict[str, Any]]:
    raw = body.get("messages")
    if raw is None:
        raise _bad("messages", "is required", "missing_parameter")
    if not isinstance(raw, list):
        raise _bad("messages", "must be a list of message objects")
    if not raw:
        raise _bad("messages", "must hold at least one message", "empty_messages")
    return [_message(m, f"messages[{i}]", allow_tools) for i, m in enumerate(raw)]


# The fields each parser reads. Anything else is ignored, and each such name is logged once per
# process (`_note_unknown`), so an operator sees what clients send that Ferry does not serve.
_GENERATION_FIELDS = frozenset({
    "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "seed", "n", "stop", "stop_token_ids", "ignore_eos",
    "min_tokens", "deterministic", "stream", "stream_options", "user", "logit_bias", "best_of",
    "logprobs", "response_format", "structured_outputs", "guided_json", "guided_regex",
    "guided_choice", "guided_grammar"})
_CHAT_FIELDS = _GENERATION_FIELDS | {"messages", "max_completion_tokens", "top_logprobs",
                                     "tools", "tool_choice", "parallel_tool_calls", "functions",
                                     "function_call"}
_COMPLETION_FIELDS = _GENERATION_FIELDS | {"prompt", "echo", "suffix"}
_EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
_NOTED: set[tuple[str, str]] = set()
_MAX_NOTED = 256                    # distinct names remembered: a client cannot grow it forever


def _note_unknown(body: dict[str, Any], known: frozenset[str], kind: str) -> None:
    for key in body.keys() - known:
        if (kind, key) in _NOTED or len(_NOTED) >= _MAX_NOTED:
            continue
        _NOTED.add((kind, key))
        log.info("%s: ignoring parameter %s, which this server does not serve (logged once)",
                 kind, ascii(key[:64]))


def parse_chat(body: Any, *, allow_tools: bool = False) -> ChatRequest:
    """A chat body; `tools` (with `tool_choice`, `parallel_tool_calls`, tool messages and
    assistant tool calls) only where `allow_tools`, the callers that render and parse them."""
    body = require_object(body)
    _note_unknown(body, _CHAT_FIELDS, "chat")
    model = _model(body)
    messages = _messages(body, allow_tools)
    params = _gen_params(body, chat=True)
    params.logprobs = _bool(body, "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if not _is_int(top) or not 0 <= top <= 20:
            raise _bad("top_logprobs", f"must be an integer in [0, 20], got {top!r}")
        if top > 0 and not params.logprobs:
            raise _bad("top_logprobs", "needs 'logprobs': true")
        params.top_logprobs = top
    if body.get("functions"):
        raise _bad("functions", "are not supported by this server; use 'tools'",
                   "unsupported_parameter")
    if body.get("tools") and not allow_tools:
        raise _bad("tools", "are not supported here (no tool calling)", "unsupported_parameter")
    tools = parse_tools(body)           # also: tool_choice other than "none" needs tools
    if tools is not None and tools.choice != "auto" and params.structured is not None:
        raise _bad("tool_choice", f"{tools.choice!r} constrains the output to tool calls, "
                   "so it cannot be combined with response_format or guided decoding")
    return ChatRequest(model, messages, params, tools)


# -- completions --------------------------------------------------------------------------------

def _prompts(body: dict[str, Any]) -> list[str | list[int]]:
    v = body.get("prompt")
    if v is None:
        raise _bad("prompt", "is required", "missing_parameter")
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v:
        if all(isinstance(x, str) for x in v):
            prompts: list[str | list[int]] = list(v)
        elif all(_is_int(x) for x in v):
            prompts = [_token_list(v, "prompt")]
        elif all(isinstance(x, list) for x in v):
            prompts = [_token_list(x, f"prompt[{i}]") for i, x in enumerate(v)]
        else:
            prompts = []
        if prompts:
            if len(prompts) > MAX_PROMPTS:
                raise _bad("prompt", f"holds {len(prompts)} prompts; at most {MAX_PROMPTS}")
            return prompts
    raise _bad("prompt", "must be a string, a list of strings, a list of token ids or a "
               "list of token-id lists, and not empty")


def parse_completion(body: Any) -> CompletionRequest:
    body = require_object(body)
    _note_unknown(body, _COMPLETION_FIELDS, "completions")
    model = _model(body)
    prompts = _prompts(body)
    params = _gen_params(body, chat=False)
    if any(isinstance(p, list) and not p for p in prompts):
        raise _bad("prompt", "token-id prompts must not be empty")
    lp = body.get("logprobs")
    if lp is not None:
        if not _is_int(lp) or not 0 <= lp <= 5:
            raise _bad("logprobs", f"must be an integer in [0, 5] or null, got {lp!r}")
        params.logprobs, params.top_logprobs = True, lp
    _unsupported(body, "suffix", ("",), "insertion (suffix) is not implemented")
    return CompletionRequest(model, prompts, params, echo=_bool(body, "echo"))


# -- embeddings ---------------------------------------------------------------------------------

def parse_embeddings(body: Any) -> EmbeddingRequest:
    body = require_object(body)
    _note_unknown(body, _EMBEDDING_FIELDS, "embeddings")
    model = _model(body)
    v = body.get("input")
    if v is None:
        raise _bad("input", "is required", "missing_parameter")
    inputs: list[str | list[int]]
    if isinstance(v, str):
        inputs = [v]
    elif isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        inputs = list(v)
    elif isinstance(v, list) and v and all(_is_int(x) for x in v):
        inputs = [_token_list(v, "input")]
    elif isinstance(v, list) and v and all(isinstance(x, list) for x in v):
        inputs = [_token_list(x, f"input[{i}]") for i, x in enumerate(v)]
        if any(not x for x in inputs):
            raise _bad("input", "token-id inputs must not be empty")
    else:
        raise _bad("input", "must be a string, a list of strings, a list of token ids or a "
                   "list of token-id lists, and not empty")
    if len(inputs) > MAX_EMBED_INPUTS:
        raise _bad("input", f"holds {len(inputs)} inputs; at most {MAX_EMBED_INPUTS}")
    fmt = body.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise _bad("encoding_format", f"must be 'float' or 'base64', got {fmt!r}")
    dims = body.get("dimensions")
    if dims is not None and not _is_int(dims):
        raise _bad("dimensions", "must be an integer")
    return EmbeddingRequest(model, inputs, fmt, dims, _optional_str(body, "user"))
