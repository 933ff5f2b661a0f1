"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

The official `openai` package works against these unchanged. Responses follow OpenAI's shapes
(ids `chatcmpl-...`/`cmpl-...`, `usage`, `finish_reason` "stop"/"length"); streams are server-sent
events in OpenAI's chunk format ending with `data: [DONE]`. Errors use the OpenAI error object
(frontends/http/errors.py) with the offending field in `param`. A client that disconnects
cancels its engine requests at once (frontends/http/sse.py).

Extensions beyond OpenAI, as vLLM names them: top_k, min_p, repetition_penalty, ignore_eos,
stop_token_ids; a model may be named `name:version` to pin a version. `prompt_template` renders
a stored template into the prompt or messages (frontends/http/prompt_templates.py).
Chat takes OpenAI's `tools` and `tool_choice` (frontends/http/tools.py): calls come back as
`message.tool_calls` with `finish_reason` "tool_calls", streamed as `delta.tool_calls` chunks.
vLLM's `/health` probe is here too, and its `/tokenize` and `/detokenize`
(frontends/http/tokenization.py).
"""
from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from aiohttp import web

from daemon import __version__
from daemon.errors import ContextLengthExceeded, FerryError, InvalidInput, UnsupportedMediaType
from frontends.http.appkeys import DISPATCHER, SETTINGS
from frontends.http.errors import error_body, request_id_of
from frontends.http.json_body import decode_json
from frontends.http.openai_schema import (ChatRequest, GenParams, parse_chat,
                                          parse_completion, parse_embeddings)
from frontends.http.prompt_templates import with_prompt_template
from frontends.http.resume import (RESUME_STORE, RetainedSink, local_events, owner_of, relay,
                                   resume_from_header)
from frontends.http.sse import EventSink, SSEResponse, until_disconnect
from frontends.http.security import principal_of
from frontends.http.textgen import (TEXTS, TOKEN_RESERVER, USAGE, Generation, Piece, TextModel,
                                    encode_prompts, install, model_toml, resolve_model)
from frontends.http.tool_calls import ToolCallParser, parse_calls
from frontends.http.tools import constraint, pick_format, render_messages

__all__ = ["routes", "setup", "read_json", "SYSTEM_FINGERPRINT"]

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
SYSTEM_FINGERPRINT = f"fp_ferry_{__version__}"
_CLIENT_CLOSED = 499


def setup(app: web.Application) -> None:
    from frontends.http.tokenization import routes as tokenization_routes   # imports this
    install(app)
    app.add_routes(routes)
    app.add_routes(tokenization_routes)


async def read_json(request: web.Request) -> Any:
    ctype = request.content_type
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType(f"content type {ctype!r} is not accepted; send "
                                   "'Content-Type: application/json'")
    return decode_json(await request.read())


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """vLLM's probe: 200 (no body) once the daemon is ready to serve, else 503."""
    pl = request.app[DISPATCHER].placement
    return web.Response(status=200 if pl is not None and pl.state == "ready" else 503)


# -- models -------------------------------------------------------------------------------------

def _model_card(name: str, version: str, entry: dict[str, Any]) -> dict[str, Any]:
    try:
        created = int(os.stat(entry.get("path", "")).st_mtime)
    except OSError:
        created = 0
    info = entry.get("info") or {}
    card = {"id": name, "object": "model", "created": created, "owned_by": "ferry",
            "version": int(version), "kind": info.get("kind", "tensor")}
    if info.get("kind") == "llm":
        card["max_model_len"] = info.get("extra", {}).get("context_length")
    return card


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    """Ready models, latest version each; a key with a model allow-list sees only its models."""
    pl = request.app[DISPATCHER].placement
    principal = principal_of(request)
    data = []
    for name, m in sorted((pl.models if pl is not None else {}).items()):
        if principal is not None and not principal.may_use(name):
            continue
        ready = [v for v, e in m.get("versions", {}).items() if e.get("state") == "ready"]
        if ready:
            latest = max(ready, key=int)
            data.append(_model_card(name, latest, m["versions"][latest]))
    return web.json_response({"object": "list", "data": data})


@routes.get("/v1/models/{model}")
async def get_model(request: web.Request) -> web.Response:
    name, version, entry = resolve_model(request.app[DISPATCHER], request.match_info["model"])
    return web.json_response(_model_card(name, str(version), entry))


# -- chat and completions ---------------------------------------------------------------------

@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    resumed = await resume_from_header(request)
    if resumed is not None:
        return resumed
    body = await with_prompt_template(request, await read_json(request), "messages")
    req = await _off_loop_if_large(request, functools.partial(parse_chat, allow_tools=True),
                                   body)
    tm = await request.app[TEXTS].text_model(req.model)
    prompt, parsers = await _off_loop_if_large(request, functools.partial(_chat_prompt, tm),
                                               req)
    ids = await tm.encode(prompt, add_special_tokens=False, param="messages")
    return await _serve(request, tm, [ids], req.params, _Shape(chat=True), "messages", [""],
                        parsers)


_Parsers = Callable[[], ToolCallParser]
_LARGE_BODY = 32 << 10     # parsed off the event loop above this: a big JSON schema's grammar
                           # is compiled to check it (~160 ms for 256 KiB)


async def _off_loop_if_large(request: web.Request, parse: Callable[[Any], Any], body: Any) -> Any:
    size = request.content_length
    if size is None:            # chunked: the body is read already (cached by aiohttp)
        size = len(await request.read())
    if size > _LARGE_BODY:
        return await asyncio.to_thread(parse, body)
    return parse(body)


def _chat_prompt(tm: TextModel, req: ChatRequest) -> tuple[str, _Parsers | None]:
    """The prompt, with the request's tools rendered as the template does (frontends/http/
    tools.py); and, when tools are offered, what parses each choice's calls. A required or
    named call becomes the request's output constraint."""
    from engines.llm.chat import template_variables
    from engines.llm.grammar import validate_structured

    source = tm.template or tm.tokenizer.chat_template
    if not source:
        return tm.render_chat(req.messages), None       # refuses: no_chat_template
    reads_tools = "tools" in template_variables(source)

    def render(messages: list[dict[str, Any]], **variables: Any) -> str:
        return tm.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                template=tm.template, **variables)

    prompt = render_messages(source, reads_tools, req.messages, req.tools, render)
    if req.tools is None:
        return prompt, None
    fmt = pick_format(source, reads_tools)
    spec = constraint(req.tools, fmt)
    if spec is not None:
        try:
            req.params.structured = validate_structured(spec)
        except InvalidInput as exc:    # a parameters schema the grammar library refuses
            exc.param = "tools"
            raise
    return prompt, functools.partial(req.tools.parser, fmt)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    resumed = await resume_from_header(request)
    if resumed is not None:
        return resumed
    body = await with_prompt_template(request, await read_json(request), "prompt")
    req = await _off_loop_if_large(request, parse_completion, body)
    tm = await request.app[TEXTS].text_model(req.model)
    prompts = await encode_prompts(tm, req.prompts)
    echo = [p if isinstance(p, str) else tm.tokenizer.decode(p) for p in req.prompts] \
        if req.echo else [""] * len(prompts)
    return await _serve(request, tm, prompts, req.params, _Shape(chat=False), "prompt", echo)


class _Shape:
    """The parts in which chat and legacy completion responses differ."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.prefix = "chatcmpl-" if chat else "cmpl-"
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def logprobs(self, tm: TextModel, ids: list[int], lps: list[float] | None,
                 offset: int = 0, tops: list[Any] | None = None) -> dict[str, Any] | None:
        """OpenAI's logprobs object: chat `content` entries with `top_logprobs` lists, or the
        completions form whose `top_logprobs` are {token: logprob} maps (tokens that decode
        alike keep the likelier one, as in OpenAI's). `tops`: per token, [[id, logprob]...]."""
        if lps is None:
            return None
        tokens = [tm.token_text(t) for t in ids]
        alts = [[(tm.token_text(int(t)), lp) for t, lp in top] for top in tops] \
            if tops is not None else None
        if self.chat:
            return {"content": [
                {"token": t, "logprob": lp, "bytes": list(t.encode()),
                 "top_logprobs": [{"token": a, "logprob": alp, "bytes": list(a.encode())}
                                  for a, alp in (alts[i] if alts else [])]}
                for i, (t, lp) in enumerate(zip(tokens, lps))]}
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        top_maps: list[dict[str, float]] | None = None
        if alts is not None:
            top_maps = [{} for _ in alts]
            for m, alt in zip(top_maps, alts):
                for a, alp in alt:              # best first: a duplicate keeps the likelier
                    m.setdefault(a, alp)
        return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": top_maps,
                "text_offset": offsets}

    def choice(self, index: int, text: str, finish: str | None, logprobs: Any) -> dict:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def delta(self, index: int, text: str | None, finish: str | None, logprobs: Any,
              role: bool = False) -> dict:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": logprobs,
                    "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


async def _serve(request: web.Request, tm: TextModel, prompts: list[list[int]],
                 params: GenParams, shape: _Shape, prompt_param: str,
                 echo: list[str], parsers: _Parsers | None = None) -> web.StreamResponse:
    store = request.app.get(RESUME_STORE) if params.resumable else None
    if params.resumable and (store is None or not store.enabled):
        raise InvalidInput("resumable streams are off on this server "
                           "(server.stream_resume_window_s = 0)", code="resume_disabled",
                           param="stream_options.resumable")
    gen = await Generation.start(request.app[DISPATCHER], tm, prompts, params,
                                 request_id=request_id_of(request), prompt_param=prompt_param)
    request[USAGE] = gen.usage      # counts as tokens arrive; charged to the key at the end
    stream_id = store.new_id(shape.prefix) if store is not None \
        else shape.prefix + uuid.uuid4().hex
    head = {"id": stream_id, "object": shape.object,
            "created": int(time.time()), "model": tm.name,
            "system_fingerprint": SYSTEM_FINGERPRINT}
    echoes = [echo[i // params.n] for i in range(len(gen.choices))]
    async with gen:     # however this ends, nothing stays running in the engine
        if store is not None:
            return await _resumable(request, store, gen, tm, params, shape, head, echoes,
                                    parsers)
        if params.stream:
            sse = SSEResponse(request)
            await until_disconnect(request, _stream(sse, gen, tm, params, shape, head, echoes,
                                                    parsers))
            return sse.resp
        body = await until_disconnect(request, _collect(gen, tm, shape, head, echoes,
                                                        parsers))
    if body is None:
        return web.Response(status=_CLIENT_CLOSED)
    return web.json_response(body, dumps=_dumps)


async def _resumable(request: web.Request, store: Any, gen: Generation, tm: TextModel,
                     params: GenParams, shape: _Shape, head: dict[str, Any],
                     echoes: list[str], parsers: _Parsers | None) -> web.StreamResponse:
    """A stream that outlives its connection (frontends/http/resume.py): the generation writes
    into the retained stream, this connection (and any resumed one) reads it. The handler
    stays until the generation ends, so its tokens are charged to this request."""
    from frontends.http.resume import _response
    stream = store.create(head["id"], owner_of(request))
    producer = asyncio.ensure_future(_stream(RetainedSink(stream, request), gen, tm, params,
                                             shape, head, echoes, parsers))
    stream.producer = producer
    resp = _response(request, stream.id)
    try:
        await relay(request, resp, local_events(stream, 0))
        await asyncio.wait([producer])
    finally:
        if not producer.done():     # this handler was cancelled (shutdown)
            producer.cancel()
            await asyncio.wait([producer])
    if not producer.cancelled():
        exc = producer.exception()
        if exc is not None and not isinstance(exc, ConnectionResetError):
            raise exc
    return resp


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


async def _collect(gen: Generation, tm: TextModel, shape: _Shape, head: dict[str, Any],
                   echoes: list[str], parsers: _Parsers | None) -> dict[str, Any]:
    n = len(gen.choices)
    texts: list[list[str]] = [[e] for e in echoes]
    ids: list[list[int]] = [[] for _ in range(n)]
    lps: list[list[float] | None] = [None] * n
    tops: list[list[Any] | None] = [None] * n
    finish: list[str | None] = [None] * n
    async for p in gen.pieces():
        texts[p.index].append(p.text)
        ids[p.index].extend(p.token_ids)
        if p.logprobs is not None:
            lps[p.index] = (lps[p.index] or []) + p.logprobs
        if p.top_logprobs is not None:
            tops[p.index] = (tops[p.index] or []) + p.top_logprobs
        finish[p.index] = p.finish_reason or finish[p.index]
    choices = [shape.choice(i, "".join(texts[i]), finish[i],
                            shape.logprobs(tm, ids[i], lps[i], len(echoes[i]), tops[i]))
               for i in range(n)]
    if parsers is not None:
        for choice in choices:
            _with_calls(choice, parsers())
    return {**head, "choices": choices, "usage": gen.usage.to_dict()}


def _with_calls(choice: dict[str, Any], parser: ToolCallParser) -> None:
    """Move the tool calls of a chat choice's text into `message.tool_calls`."""
    message = choice["message"]
    message["content"], calls = parse_calls(parser, message["content"])
    if calls:
        message["tool_calls"] = [c.openai() for c in calls]
        if choice["finish_reason"] == "stop":
            choice["finish_reason"] = "tool_calls"


async def _stream(sse: EventSink, gen: Generation, tm: TextModel, params: GenParams,
                  shape: _Shape, head: dict[str, Any], echoes: list[str],
                  parsers: _Parsers | None) -> None:
    head = {**head, "object": shape.chunk_object}
    if params.include_usage:
        head["usage"] = None
    offsets = [len(e) for e in echoes]
    await sse.open()        # the headers go out at once, before the first token
    for i, echo in enumerate(echoes):
        if echo:
            await sse.send({**head, "choices": [shape.delta(i, echo, None, None)]})
    # A chat choice's role rides on its first generated content, as vLLM sends it: a client
    # that stamps time to first token on the first chunk then measures the real one.
    unroled = set(range(len(echoes))) if shape.chat else set()
    calls = {i: parsers() for i in range(len(echoes))} if parsers is not None else {}
    try:
        async for p in gen.pieces():
            if calls:
                await _send_tool_piece(sse, p, calls[p.index], tm, head, unroled)
            else:
                await _send_piece(sse, p, tm, shape, head, offsets, unroled)
    except FerryError as exc:
        log.warning("stream %s failed: %s", head["id"], exc.message)
        # The headers went out already: the error travels as an event, which the OpenAI
        # clients raise from the stream.
        await sse.send(error_body(exc.status, exc.code, exc.message,
                                  request_id_of(sse.request), exc.param))
        await sse.close()
        return
    if params.include_usage:
        await sse.send({**head, "choices": [], "usage": gen.usage.to_dict()})
    await sse.close()


async def _send_piece(sse: EventSink, p: Piece, tm: TextModel, shape: _Shape,
                      head: dict[str, Any], offsets: list[int], unroled: set[int]) -> None:
    lp = shape.logprobs(tm, p.token_ids, p.logprobs, offsets[p.index], p.top_logprobs)
    offsets[p.index] += len(p.text)
    if p.text or (lp and p.finish_reason is None):
        role = p.index in unroled
        unroled.discard(p.index)
        await sse.send({**head, "choices": [shape.delta(p.index, p.text, None, lp, role)]})
        lp = None
    if p.finish_reason is not None:
        role = p.index in unroled       # a choice that ended without any content
        unroled.discard(p.index)
        await sse.send({**head, "choices": [shape.delta(p.index, None, p.finish_reason, lp,
                                                       role)]})


async def _send_tool_piece(sse: EventSink, p: Piece, parser: ToolCallParser, tm: TextModel,
                           head: dict[str, Any], unroled: set[int]) -> None:
    """A chat piece of a request with tools: content, then `delta.tool_calls` chunks (a call's
    index, id, type and name first, its arguments in pieces after) as the openai client
    assembles them; a choice that called a tool finishes with "tool_calls"."""
    lp = _Shape(chat=True).logprobs(tm, p.token_ids, p.logprobs, 0, p.top_logprobs)
    deltas = parser.feed(p.text) + (parser.finish() if p.finish_reason is not None else [])
    for d in deltas:
        delta = d.openai()
        if p.index in unroled:
            unroled.discard(p.index)
            delta = {"role": "assistant", **delta}
        await sse.send({**head, "choices": [{"index": p.index, "delta": delta,
                                             "logprobs": lp, "finish_reason": None}]})
        lp = None
    if p.finish_reason is None:
        return
    finish = "tool_calls" if parser.calls and p.finish_reason == "stop" else p.finish_reason
    delta = {"role": "assistant"} if p.index in unroled else {}
    unroled.discard(p.index)
    await sse.send({**head, "choices": [{"index": p.index, "delta": delta, "logprobs": lp,
                                         "finish_reason": finish}]})


# -- embeddings ---------------------------------------------------------------------------------

@dataclass(slots=True)
class Embedder:
    """One embedding model version: its tokenizer and tensor names."""

    name: str
    version: int
    tokenizer: Any                        # tokenizers.Tokenizer, truncation and padding off
    max_length: int
    input_names: tuple[str, ...]
    output: str
    dim: int
    max_batch: int


def _load_embedder(name: str, version: int, entry: dict[str, Any]) -> Embedder:
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(entry["path"])
    section = model_toml(path).get("tokenizer")
    info = entry.get("info", {})
    outputs = [o for o in info.get("outputs", []) if len(o.get("shape", ())) == 2
               and o.get("dtype", "").startswith("float")]
    inputs = tuple(i["name"] for i in info.get("inputs", []))
    if not isinstance(section, dict) or "input_ids" not in inputs or not outputs:
        raise InvalidInput(f"model {name!r} is not an embedding model (it needs a [tokenizer] "
                           "table, an input_ids input and a [batch, dim] float output)",
                           code="model_not_embedding", param="model")
    out = next((o for o in outputs if o["name"] == "embeddings"), outputs[0])
    try:
        tok = HFTokenizer.from_file(str(path / section.get("file", "tokenizer.json")))
    except Exception as exc:   # the tokenizers library raises plain Exception on a bad file
        raise FerryError(f"cannot load the tokenizer of {name!r}: {exc}",
                         code="tokenizer_error", status=500) from exc
    # Over-long inputs are an error, as with OpenAI, not a silently truncated embedding.
    tok.no_truncation()
    tok.no_padding()
    return Embedder(name, version, tok, int(section.get("max_length", 512)), inputs,
                    out["name"], int(out["shape"][1]), max(1, int(info.get("max_batch_size", 1))))


async def _embedder(request: web.Request, model: str) -> Embedder:
    name, version, entry = resolve_model(request.app[DISPATCHER], model)
    if entry.get("info", {}).get("kind") == "llm":
        raise InvalidInput(f"model {name!r} is a text-generation model, not an embedding "
                           "model", code="model_not_embedding", param="model")
    return await request.app[TEXTS].get(name, version, entry, _load_embedder)


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    req = parse_embeddings(await read_json(request))
    emb = await _embedder(request, req.model)
    if req.dimensions is not None and req.dimensions != emb.dim:
        raise InvalidInput(f"model {emb.name!r} returns {emb.dim} dimensions; other values of "
                           "'dimensions' are not supported", code="unsupported_parameter",
                           param="dimensions")
    ids = await _embed_tokens(emb, req.inputs)
    reserve = TOKEN_RESERVER.get()      # the key's tokens per minute, before the engine runs
    if reserve is not None:
        await reserve(sum(len(x) for x in ids))
    vectors = await _embed(request, emb, ids)
    data = []
    for i, vec in enumerate(vectors):
        value: Any = (base64.b64encode(vec.astype("<f4").tobytes()).decode()
                      if req.encoding_format == "base64" else vec.tolist())
        data.append({"object": "embedding", "index": i, "embedding": value})
    used = sum(len(x) for x in ids)
    return web.json_response({"object": "list", "data": data, "model": emb.name,
                              "usage": {"prompt_tokens": used, "total_tokens": used}},
                             dumps=_dumps)


async def _embed_tokens(emb: Embedder, inputs: list[str | list[int]]) -> list[list[int]]:
    texts = [x for x in inputs if isinstance(x, str)]
    encode = emb.tokenizer.encode_batch
    if sum(len(t) for t in texts) > 8192:
        encoded = iter(await asyncio.to_thread(encode, texts))
    else:
        encoded = iter(encode(texts))
    vocab = emb.tokenizer.get_vocab_size()
    out = []
    for i, x in enumerate(inputs):
        param = "input" if len(inputs) == 1 else f"input[{i}]"
        ids = next(encoded).ids if isinstance(x, str) else x
        if len(ids) > emb.max_length:
            raise ContextLengthExceeded(f"input is {len(ids)} tokens long; model {emb.name!r} "
                                        f"takes at most {emb.max_length}", param=param)
        if not isinstance(x, str) and max(x) >= vocab:
            raise InvalidInput(f"token id {max(x)} is outside the vocabulary [0, {vocab})",
                               code="invalid_parameter", param=param)
        out.append(ids)
    return out


async def _embed(request: web.Request, emb: Embedder, ids: list[list[int]]) -> list[np.ndarray]:
    """Vectors for every input, in batches of the model's size, sorted by length so padding
    stays small; each batch is padded to its longest input (padded positions are masked)."""
    d, settings = request.app[DISPATCHER], request.app[SETTINGS]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = [order[k:k + emb.max_batch] for k in range(0, len(order), emb.max_batch)]
    calls = [d.infer(emb.name, emb.version, _batch_arrays(emb, [ids[i] for i in b]),
                     outputs=[emb.output], timeout_s=settings.request_timeout_s,
                     request_id=request_id_of(request)) for b in batches]
    results = await asyncio.gather(*calls, return_exceptions=True)
    vectors: list[np.ndarray] = [np.empty(0)] * len(ids)
    error: BaseException | None = None
    for batch, res in zip(batches, results):
        if isinstance(res, BaseException):
            error = error or res
            continue
        out = np.array(res.arrays[emb.output], dtype=np.float32)     # [B, D], copied
        res.release()
        for row, i in enumerate(batch):
            vectors[i] = out[row]
    if error is not None:
        raise error
    return vectors


def _batch_arrays(emb: Embedder, rows: list[list[int]]) -> dict[str, np.ndarray]:
    width = max(len(r) for r in rows)
    input_ids = np.zeros((len(rows), width), dtype=np.int64)           # [B, S]
    mask = np.zeros((len(rows), width), dtype=np.int64)                # [B, S]
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    arrays = {"input_ids": input_ids}
    if "attention_mask" in emb.input_names:
        arrays["attention_mask"] = mask
    if "token_type_ids" in emb.input_names:
        arrays["token_type_ids"] = np.zeros_like(input_ids)
    return arrays
