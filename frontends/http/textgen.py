"""The frontend side of text generation: tokenizers per model version, chat templates, and the
turning of engine token streams into text.

Tokenization and detokenization run here, not in the engine loop (DESIGN.md). A `Generation` is
one API request: n choices for each of its prompts, all submitted to the engine at once so they
share batches, merged into one stream of `Piece`s in arrival order. Each choice decodes its
tokens incrementally and applies the request's stop strings to the decoded text: a tail that
could still become a stop string is held back, and a completed stop string cuts the text there
and cancels the engine request at once, so no KV block is held for text nobody will read.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from aiohttp import web

from daemon.errors import ContextLengthExceeded, FerryError, InvalidInput, ModelNotFound
from frontends.dispatch import Dispatcher, Stream
from frontends.http.appkeys import DISPATCHER, request_key
from frontends.http.openai_schema import GenParams

__all__ = ["TextModel", "ModelTexts", "Piece", "Usage", "StopMatcher", "Choice",
           "Generation", "TEXTS", "USAGE", "TOKEN_RESERVER", "install", "encode_prompts",
           "model_toml", "resolve_model"]

log = logging.getLogger(__name__)

# Prompts longer than this are tokenized on a worker thread so the event loop stays responsive.
_INLINE_CHARS = 8192
_FINISH = {"stop": "stop", "length": "length"}


def resolve_model(d: Dispatcher, model: str) -> tuple[str, int, dict[str, Any]]:
    """(name, version, placement entry) for `name`, a SHA-256 id, or `name:version`."""
    try:
        name, version, _ = d.resolve(model)
    except ModelNotFound as exc:
        base, sep, ver = model.rpartition(":")
        if not sep or not (ver.isascii() and ver.isdigit()):     # int("²") fails
            raise ModelNotFound(exc.message, param="model") from None
        try:
            name, version, _ = d.resolve(base, int(ver))
        except ModelNotFound as inner:
            raise ModelNotFound(inner.message, param="model") from None
    entry = d.placement.models[name]["versions"][str(version)]  # type: ignore[union-attr]
    return name, version, entry


def model_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path / "model.toml", "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FerryError(f"cannot read {path / 'model.toml'}: {exc}", code="model_config_error",
                         status=500) from exc


@dataclass(slots=True)
class TextModel:
    """One LLM version's frontend resources."""

    name: str
    version: int
    tokenizer: Any                        # engines.llm.tokenizer.Tokenizer
    context_length: int
    vocab_size: int
    template: str | None                  # model.toml [llm] chat_template; None: the model's

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if self.template is None and not self.tokenizer.chat_template:
            raise InvalidInput(f"model {self.name!r} has no chat template; use /v1/completions "
                               "or set [llm] chat_template in its model.toml",
                               code="no_chat_template", param="messages")
        # The template runs sandboxed; a conversation it rejects (roles out of order) is an
        # InvalidInput naming `messages`.
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  template=self.template)

    async def encode(self, text: str, *, add_special_tokens: bool,
                     param: str = "prompt") -> list[int]:
        self._check_size(text, param)
        if len(text) <= _INLINE_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(self.tokenizer.encode, text,
                                       add_special_tokens=add_special_tokens)

    def _check_size(self, text: str, param: str) -> None:
        """Refuse a text that cannot fit the context before tokenizing it: that costs seconds
        and gigabytes for megabytes of text. It is at least ceil(bytes / max_token_bytes)
        tokens long, and a prompt must leave room for one generated token."""
        per_token = self.tokenizer.max_token_bytes
        bound = per_token * (self.context_length - 1) if per_token else 0
        if not bound or len(text) <= bound // 4:       # <= 4 bytes per character: it may fit
            return
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > bound:
            raise ContextLengthExceeded(
                f"the prompt is {size} bytes long, so at least {-(-size // per_token)} tokens; "
                f"model {self.name!r} has a context length of {self.context_length} tokens",
                param=param)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


class ModelTexts:
    """Tokenizers per model version, loaded once on a worker thread and shared by requests."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.d = dispatcher
        self._cache: dict[tuple[str, int, str], asyncio.Future] = {}

    async def text_model(self, model: str) -> TextModel:
        name, version, entry = resolve_model(self.d, model)
        if entry.get("info", {}).get("kind") != "llm":
            raise InvalidInput(f"model {name!r} is not a text-generation model; it serves "
                               "tensors (use /v2/models/.../infer or /v1/embeddings)",
                               code="model_not_generative", param="model")
        # load shedding before the prompt is tokenized (frontends/load_shed.py)
        await self.d.shedder.precheck(entry.get("engines", []), name, version)
        return await self.get(name, version, entry, _load_text_model)

    async def get(self, name: str, version: int, entry: dict[str, Any], loader: Any) -> Any:
        """`loader(name, version, entry)`'s result, run once per version on a worker thread."""
        key = (name, version, str(entry.get("path", "")))
        fut = self._cache.get(key) or self._load(key, loader, entry)
        return await asyncio.shield(fut)

    def _load(self, key: tuple[str, int, str], loader: Any, entry: dict[str, Any]
              ) -> asyncio.Future:
        fut = asyncio.ensure_future(asyncio.to_thread(loader, key[0], key[1], entry))

        def done(f: asyncio.Future) -> None:
            if f.cancelled() or f.exception() is None:
                return
            log.warning("loading the tokenizer of %s v%d failed: %s", key[0], key[1],
                        f.exception())
            if self._cache.get(key) is f:
                del self._cache[key]        # a fixed model is picked up on the next request
        fut.add_done_callback(done)
        self._cache[key] = fut
        return fut

    def warm(self) -> None:
        """Start loading tokenizers of ready LLM versions; forget versions that are gone."""
        pl = self.d.placement
        if pl is None:
            return
        live = set()
        for name, m in pl.models.items():
            for ver, entry in m.get("versions", {}).items():
                if entry.get("state") != "ready":
                    continue
                key = (name, int(ver), str(entry.get("path", "")))
                live.add(key)
                if key in self._cache:
                    continue
                # Only LLM tokenizers are worth preloading (a GGUF vocabulary takes seconds);
                # an embedder's tokenizer.json loads in milliseconds on first use.
                if entry.get("info", {}).get("kind") != "llm":
                    continue
                self._load(key, _load_text_model, entry)
        for key in set(self._cache) - live:
            del self._cache[key]


TEXTS = web.AppKey("model_texts", ModelTexts)
_WARM_PERIOD_S = 0.5


def install(app: web.Application) -> None:
    """Give `app` its tokenizer cache (once, for every route module that needs it), preloading
    tokenizers as versions become ready so the first request does not pay for the load."""
    if TEXTS in app:
        return
    texts = app[TEXTS] = ModelTexts(app[DISPATCHER])

    async def warm_loop() -> None:
        epoch = -1
        while True:
            pl = texts.d.placement
            if pl is not None and pl.epoch != epoch:
                epoch = pl.epoch
                texts.warm()
            await asyncio.sleep(_WARM_PERIOD_S)

    async def run(app: web.Application):   # cleanup context: started with the app
        task = asyncio.create_task(warm_loop())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    app.cleanup_ctx.append(run)


def _no_tokenizer(name: str, why: str) -> InvalidInput:
    return InvalidInput(f"model {name!r} has no tokenizer ({why}), so it serves no text; "
                        "the ZeroMQ frontend takes its prompts as token ids",
                        code="model_has_no_tokenizer", param="model")


def _load_text_model(name: str, version: int, entry: dict[str, Any]) -> TextModel:
    from engines.llm.tokenizer import Tokenizer

    path = Path(entry["path"])
    spec = model_toml(path)
    llm = spec.get("llm", {})
    weights = path / spec["weights"] if spec.get("weights") else path
    ggufs = [weights] if weights.suffix == ".gguf" else sorted(path.glob("*.gguf"))
    try:
        if ggufs:
            from engines.llm.gguf_loader import read_gguf
            from engines.llm.tokenizer import gguf_tokenizer_meta
            gf = read_gguf(ggufs[0])
            if not gguf_tokenizer_meta(gf.metadata)["tokens"]:
                raise _no_tokenizer(name, "its GGUF file carries no tokenizer vocabulary")
            tok = Tokenizer.from_gguf_file(gf)
        elif not (path / "tokenizer.json").is_file():
            raise _no_tokenizer(name, "its directory has no tokenizer.json")
        else:
            tok = Tokenizer.from_file(path / "tokenizer.json")
    except InvalidInput:
        raise
    except (OSError, ValueError, KeyError, FerryError) as exc:
        # the model loaded but its tokenizer does not build here: the server's fault, passing
        raise FerryError(f"cannot load the tokenizer of {name!r}: {exc}",
                         code="tokenizer_error", status=503) from exc
    extra = entry.get("info", {}).get("extra", {})
    template = llm.get("chat_template") if isinstance(llm.get("chat_template"), str) else None
    log.info("tokenizer of %s v%d loaded", name, version)
    return TextModel(name, version, tok, int(extra.get("context_length", 2048)),
                     int(extra.get("vocab_size", 0)), template)


# -- text from tokens ------------------------------------------------------------------------

class StopMatcher:
    """Cuts text at the first stop string; holds back a tail that could still start one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self._buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, stopped). After a stop, the text after it is dropped."""
        if not self.stops:
            return text, False
        buf = self._buf + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._buf = ""
            return buf[:cut], True
        hold = self._held_tail(buf)
        self._buf = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out

    def _held_tail(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        longest = max(len(s) for s in self.stops) - 1
        for k in range(min(len(buf), longest), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


@dataclass(slots=True)
class Piece:
    """New output of one choice."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None = None
    top_logprobs: list[list[list[float]]] | None = None   # per token: [[token_id, logprob], ...]


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# The request's Usage, set by generation routes so that the security layer can charge a key's
# tokens per minute for streamed responses too, whose usage is in no JSON body.
USAGE = request_key("ferry_usage", Usage)
# The token budget of the work running in this context (an HTTP request, a WebSocket message's
# task, a batch item), set by whoever charges it to a key (frontends/http/security.py,
# frontends/http/batch_runner.py): `Generation.start` awaits it with the prompt's tokens plus every
# token the generation may add, before anything reaches an engine, so a key's tokens per minute
# are reserved at admission; it raises RateLimited (or, for batch items, waits).
TOKEN_RESERVER: contextvars.ContextVar[Callable[[int], Awaitable[None]] | None] = \
    contextvars.ContextVar("ferry_token_reserver", default=None)


class Choice:
    """One engine stream turned into text pieces."""

    def __init__(self, index: int, tm: TextModel, stream: Stream, stops: list[str],
                 usage: Usage, count_cached: bool) -> None:
        self.index, self.tm, self.stream, self.usage = index, tm, stream, usage
        self.matcher = StopMatcher(stops)
        self.count_cached = count_cached

    async def pieces(self) -> AsyncIterator[Piece]:
        from engines.llm.tokenizer import IncrementalDecoder

        decoder = IncrementalDecoder(self.tm.tokenizer, skip_special_tokens=True)
        ids: list[int] = []
        lps: list[float] | None = None
        tops: list[Any] | None = None
        async for msg in self.stream:
            if msg.prompt_tokens and self.count_cached:
                self.usage.cached_tokens += msg.cached_tokens
            self.usage.completion_tokens += len(msg.token_ids)
            ids.extend(msg.token_ids)
            if msg.logprobs is not None:
                lps = (lps or []) + list(msg.logprobs)
            if msg.top_logprobs is not None:
                tops = (tops or []) + list(msg.top_logprobs)
            text = decoder.push(msg.token_ids)
            if msg.finished:
                text += decoder.flush()
            out, stopped = self.matcher.push(text)
            if stopped:
                await self.stream.cancel()
                yield Piece(self.index, out, ids, lps, "stop", tops)
                return
            if msg.finished:
                yield Piece(self.index, out + self.matcher.flush(), ids, lps,
                            _finish_reason(msg.finish_reason), tops)
                return
            if out:
                yield Piece(self.index, out, ids, lps, None, tops)
                ids, lps, tops = [], None, None


def _finish_reason(reason: str | None) -> str:
    if reason in _FINISH:
        return _FINISH[reason]
    raise FerryError(f"the engine ended the generation ({reason})", code="generation_aborted",
                     status=503)


@dataclass(slots=True)
class Generation:
    """All choices of one request. Use `async with`: leaving it cancels what is still running."""

    choices: list[Choice]
    usage: Usage
    prompt_ids: list[list[int]]
    _tasks: list[asyncio.Task] = field(default_factory=list)

    @classmethod
    async def start(cls, d: Dispatcher, tm: TextModel, prompts: list[list[int]],
                    params: GenParams, *, request_id: str = "",
                    prompt_param: str = "prompt") -> Generation:
        budgets = [_max_tokens(tm, len(p), params.max_tokens, prompt_param) for p in prompts]
        if params.min_tokens > min(budgets):    # max_tokens unset: the context left is the cap
            raise ContextLengthExceeded(
                f"min_tokens ({params.min_tokens}) exceeds the {min(budgets)} tokens the "
                f"context of model {tm.name!r} leaves after the prompt", param="min_tokens")
        _check_token_ids(tm, params.stop_token_ids, "stop_token_ids")
        usage = Usage(prompt_tokens=sum(len(p) for p in prompts))
        reserve = TOKEN_RESERVER.get()
        if reserve is not None:
            await reserve(usage.prompt_tokens + params.n * sum(budgets))
        gen = cls([], usage, prompts)
        try:
            for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
                for j in range(params.n):
                    stream = await d.generate(tm.name, tm.version, prompt,
                                              params.engine_params(budget, j), request_id)
                    gen.choices.append(Choice(i * params.n + j, tm, stream, params.stop, usage,
                                              count_cached=j == 0))
        except BaseException:
            await gen.close()
            raise
        return gen

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for choice in self.choices:
            await choice.stream.cancel()     # a no-op for streams that finished

    async def pieces(self) -> AsyncIterator[Piece]:
        """Pieces of every choice in arrival order; each choice ends with a finish_reason."""
        if len(self.choices) == 1:
            async for piece in self.choices[0].pieces():
                yield piece
            return
        queue: asyncio.Queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(_pump(c, queue)) for c in self.choices]
        remaining = len(self.choices)
        while remaining:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None:
                remaining -= 1
            yield item


async def _pump(choice: Choice, queue: asyncio.Queue) -> None:
    try:
        async for piece in choice.pieces():
            queue.put_nowait(piece)
    except FerryError as exc:
        queue.put_nowait(exc)


def _max_tokens(tm: TextModel, prompt_len: int, asked: int | None, prompt_param: str) -> int:
    ctx = tm.context_length
    if prompt_len >= ctx:
        raise ContextLengthExceeded(
            f"the prompt is {prompt_len} tokens long; model {tm.name!r} has a context length "
            f"of {ctx} tokens, which must also hold at least one generated token",
            param=prompt_param)
    if asked is None:
        return ctx - prompt_len
    if prompt_len + asked > ctx:
        raise ContextLengthExceeded(
            f"the prompt ({prompt_len} tokens) plus max_tokens ({asked}) exceeds the context "
            f"length of model {tm.name!r} ({ctx} tokens); lower max_tokens to at most "
            f"{ctx - prompt_len}", param="max_tokens")
    return asked


def _check_token_ids(tm: TextModel, ids: list[int], param: str) -> None:
    bad = [t for t in ids if tm.vocab_size and t >= tm.vocab_size]
    if bad:
        raise InvalidInput(f"token id {bad[0]} is outside the vocabulary of {tm.name!r} "
                           f"[0, {tm.vocab_size})", code="invalid_parameter", param=param)


async def encode_prompts(tm: TextModel, prompts: list[str | list[int]]) -> list[list[int]]:
    """Token ids for completion prompts (text gets the model's BOS as its tokenizer adds it)."""
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids = await tm.encode(p, add_special_tokens=True)
            if not ids:
                raise InvalidInput("the prompt is empty (no tokens)", code="empty_prompt",
                                   param="prompt")
        else:
            _check_token_ids(tm, p, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
            ids = p
        out.append(ids)
    return out
