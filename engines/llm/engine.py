"""The LLM engine: a Llama-family decoder served with continuous batching over a paged KV cache.

`step()` is one scheduler step: schedule, one forward pass over every scheduled token, sample
the sequences whose logits are due, record the tokens, emit one `TokenOutput` per sequence that
produced a token. Requests are validated in full at `submit()` so nothing can fail later for a
reason the client could have been told about up front.
"""
from __future__ import annotations

import logging
import operator
import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from daemon.errors import (ContextLengthExceeded, FerryError, InternalError, InvalidInput,
                           ModelUnavailable)
from engines.base import (Engine, GenerateRequest, ModelInfo, ModelSpec, TensorSpec,
                          TokenOutput)
from engines.llm.block_pool import BlockPool
from engines.llm.config import LlamaConfig, ModelLoadFailed
from engines.llm.kv_cache import PagedKVCache
from engines.llm.kv_events import AllBlocksCleared, KVEventLog
from engines.llm.kv_publisher import KVEventPublisher
from engines.llm.latency import RequestLatency
from engines.llm.model import ForwardBatch, LlamaModel, load_model
from engines.llm.quant import WEIGHT_FORMATS
from engines.llm.grammar import GrammarCompiler, allowed_tokens
from engines.llm.sampling import Sampler, SamplingParams
from engines.llm.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from engines.llm.sequence import SeqTiming, Sequence

__all__ = ["LLMEngine", "LLMOptions", "THREADS_ENV"]

log = logging.getLogger(__name__)

THREADS_ENV = "FERRY_TORCH_THREADS"      # overrides [llm] num_threads
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True, frozen=True)
class LLMOptions:
    """The `[llm]` table of model.toml."""

    kv_cache_mb: float = 256
    block_size: int = 16
    max_num_seqs: int = 32
    max_batched_tokens: int = 512
    num_threads: int = 0                 # 0: leave torch's default
    dtype: str | None = None             # None: the loader's default for the device
    weight_format: str = "auto"          # auto | float | int8 | int4 (engines.llm.quant)
    # KV-cache events (engines.llm.kv_events): "" = off, else the PUB endpoint this model binds
    kv_events_endpoint: str = ""
    kv_events_topic: str = "kv@{host}@{model}"   # llm-d's topic form; {host}, {model} filled in
    # every request computed batch-invariantly (LlamaModel.forward's `deterministic`); a request
    # can also ask for it alone (SamplingParams.deterministic)
    deterministic: bool = False

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> LLMOptions:
        opts = cls(**{k: section[k] for k in cls.__slots__ if k in section})
        ints = {"block_size": (1, 1024), "max_num_seqs": (1, 4096),
                "max_batched_tokens": (1, 1 << 20), "num_threads": (0, 1024)}
        for key, (lo, hi) in ints.items():
            value = getattr(opts, key)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise _bad_option(key, f"must be an integer in [{lo}, {hi}], got {value!r}")
        mb = opts.kv_cache_mb
        if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb > 0:
            raise _bad_option("kv_cache_mb", f"must be a number > 0, got {mb!r}")
        if opts.max_batched_tokens < opts.max_num_seqs:
            raise _bad_option("max_batched_tokens", "must be >= max_num_seqs, so every running "
                              "sequence can decode in each step")
        if opts.dtype is not None and opts.dtype not in _DTYPES:
            raise _bad_option("dtype", f"must be one of {sorted(_DTYPES)}, got {opts.dtype!r}")
        ep = opts.kv_events_endpoint
        if not isinstance(ep, str) or ep and not ep.startswith(("tcp://", "ipc://")):
            raise _bad_option("kv_events_endpoint", f"must be \"\" (off) or a tcp:// or ipc:// "
                              f"endpoint, got {ep!r}")
        try:
            opts.kv_events_topic.format(host="", model="")
        except (AttributeError, KeyError, IndexError, ValueError):
            raise _bad_option("kv_events_topic", "must be a string whose only fields are {host} "
                              f"and {{model}}, got {opts.kv_events_topic!r}") from None
        if not isinstance(opts.deterministic, bool):
            raise _bad_option("deterministic", f"must be true or false, got "
                              f"{opts.deterministic!r}")
        if opts.weight_format not in WEIGHT_FORMATS:
            raise _bad_option("weight_format", f"must be one of {list(WEIGHT_FORMATS)}, "
                              f"got {opts.weight_format!r}")
        return opts


def _bad_option(key: str, why: str) -> ModelLoadFailed:
    return ModelLoadFailed(f"model.toml [llm] {key} {why}", param=f"llm.{key}")


def find_weights(spec: ModelSpec) -> Path:
    """`spec.weights` inside the version directory, else its one .gguf, else the directory
    itself (config.json + *.safetensors)."""
    if spec.weights:
        return Path(spec.path) / spec.weights
    ggufs = sorted(Path(spec.path).glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if len(ggufs) > 1:
        raise ModelLoadFailed(f"{spec.path} holds several .gguf files; set `weights`")
    return Path(spec.path)


class LLMEngine(Engine):
    kind = "llm"

    def __init__(self) -> None:
        # Everything below but the counters is set by start(); `model is None` means unloaded.
        self.model: LlamaModel | None = None
        self.cfg: LlamaConfig | None = None
        self.device = torch.device("cpu")
        self.kv: PagedKVCache | None = None
        self.pool: BlockPool | None = None
        self.scheduler: Scheduler | None = None
        self.sampler: Sampler | None = None
        self.grammars: GrammarCompiler | None = None   # structured outputs, set by load()
        self._mask_pool: ThreadPoolExecutor | None = None
        self.kv_events: KVEventPublisher | None = None
        self._kv_log: KVEventLog | None = None        # the pool's event log while publishing
        self.max_context = 0
        self.deterministic = False
        self._seqs: dict[str, Sequence] = {}
        # prompt_tokens: whole prompts (cached part included) of requests that produced their
        # first token, as vLLM counts them
        self._counters = dict(steps=0, tokens_generated=0, tokens_computed=0,
                              prompt_tokens_computed=0, prompt_tokens=0, forward_errors=0)
        self.latency = RequestLatency()

    # -- lifecycle ---------------------------------------------------------------------------

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        opts = LLMOptions.from_section(spec.section("llm"))
        threads = _env_threads() or opts.num_threads
        if threads > 0:
            torch.set_num_threads(threads)
        path = find_weights(spec)
        try:
            model = load_model(path, device=device,
                               dtype=_DTYPES[opts.dtype] if opts.dtype else None,
                               weights=opts.weight_format)
        except FerryError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelLoadFailed(f"cannot load {path}: {exc}") from exc
        key = spec.sha256 or f"{spec.name}:{spec.version}:{path}"
        self.start(model, opts, model_key=key, name=spec.name)
        cfg = model.cfg
        self.grammars = GrammarCompiler.for_weights(Path(path), cfg.vocab_size, cfg.eos_ids)
        log.info("llm %s v%d: %d KV blocks of %d tokens (%.0f MB), context %d, %d threads",
                 spec.name, spec.version, self.pool.num_blocks, opts.block_size,
                 opts.kv_cache_mb, self.max_context, torch.get_num_threads())
        return ModelInfo(
            name=spec.name, version=spec.version, platform="ferry_llm", kind="llm",
            inputs=[TensorSpec("input_ids", "int64", (-1,))],
            outputs=[TensorSpec("token_ids", "int64", (-1,))],
            max_batch_size=opts.max_num_seqs,
            extra={"context_length": self.max_context, "vocab_size": cfg.vocab_size,
                   "eos_ids": list(cfg.eos_ids), "bos_id": cfg.bos_id,
                   "block_size": opts.block_size, "kv_blocks": self.pool.num_blocks,
                   "weight_format": model.weight_format,
                   "memory_bytes": model.weight_bytes() + self.pool.num_blocks
                   * PagedKVCache.bytes_per_block(cfg, opts.block_size, model.dtype)})

    def start(self, model: LlamaModel, opts: LLMOptions, model_key: str = "",
              name: str = "") -> None:
        """Serve an already built model (load() and tests both come through here)."""
        cfg = self.cfg = model.cfg
        self.model = model
        self.device = model.device
        dtype = model.dtype
        budget = int(opts.kv_cache_mb * (1 << 20))
        num_blocks = budget // PagedKVCache.bytes_per_block(cfg, opts.block_size, dtype)
        if num_blocks < 1:
            raise _bad_option("kv_cache_mb", f"{opts.kv_cache_mb} MB holds no block of "
                              f"{opts.block_size} tokens")
        self.kv = PagedKVCache(cfg, num_blocks, opts.block_size, dtype, self.device)
        self.pool = BlockPool(num_blocks, opts.block_size, model_key)
        every_layer_slides = len(cfg.window_layers) == cfg.num_layers
        self.scheduler = Scheduler(self.pool, SchedulerConfig(
            opts.max_num_seqs, opts.max_batched_tokens, opts.deterministic,
            window=cfg.sliding_window if every_layer_slides else None))
        self.deterministic = opts.deterministic
        self.sampler = Sampler(self.device)
        # A sequence must fit in the pool on its own, or preemption could never make room.
        self.max_context = min(cfg.max_context, num_blocks * opts.block_size)
        if self.max_context < cfg.max_context:
            log.warning("KV cache of %d tokens limits the context to %d (model: %d); raise "
                        "[llm] kv_cache_mb for longer requests", num_blocks * opts.block_size,
                        self.max_context, cfg.max_context)
        self._warm_up()
        if opts.kv_events_endpoint:
            self.pool.events = self._kv_log = KVEventLog(opts.block_size)
            topic = opts.kv_events_topic.format(host=socket.gethostname(), model=name)
            self.kv_events = KVEventPublisher(opts.kv_events_endpoint, topic)
            # a restarted engine starts empty: indexers drop what its predecessor held
            self.kv_events.publish(time.time(), [AllBlocksCleared()])

    def _warm_up(self) -> None:
        """A tiny prefill and decode so the first request does not pay for lazy initialisation
        (allocator pools, kernel selection, CUDA context)."""
        blocks = self.pool.allocate(1)
        n = min(4, self.pool.block_size - 1) or 1
        dev = self.device
        self.model(ForwardBatch(torch.zeros(n, dtype=torch.int64, device=dev),
                                torch.arange(n, device=dev), [n], [n], [blocks]), self.kv)
        if n < self.pool.block_size:
            self.model(ForwardBatch(torch.zeros(1, dtype=torch.int64, device=dev),
                                    torch.tensor([n], device=dev), [1], [n + 1], [blocks]),
                       self.kv)
        self.pool.free(blocks)

    def unload(self) -> None:
        for seq in list(self._seqs.values()):
            self.scheduler.abort(seq)
        self._seqs.clear()
        if self.kv_events is not None and self._kv_log is not None:
            self.kv_events.publish(time.time(), [*self._kv_log.drain(), AllBlocksCleared()])
            self.kv_events.close()
            self.kv_events = self._kv_log = None
        self.model = None
        self.kv = None
        self.grammars = None             # the tokenizer and compiled grammar templates
        if self._mask_pool is not None:
            self._mask_pool.shutdown(wait=True)
            self._mask_pool = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- requests ----------------------------------------------------------------------------

    def submit(self, request: GenerateRequest) -> None:
        if self.model is None:
            raise ModelUnavailable("the model is not loaded")
        if not isinstance(request, GenerateRequest):
            raise InvalidInput("the llm engine takes generate requests, not tensors")
        if request.id in self._seqs:
            raise InvalidInput(f"request id {request.id!r} is already in flight", param="id")
        params = request.params
        if not isinstance(params, SamplingParams):
            raise InvalidInput("sampling parameters are missing", param="params")
        params.validate(self.cfg.vocab_size)
        prompt = self._check_prompt(request.prompt_ids)
        if params.resume >= len(prompt):
            raise InvalidInput("resume must be shorter than the prompt", param="resume")
        if len(prompt) - params.resume + params.max_tokens > self.max_context:
            param = "prompt_ids" if len(prompt) >= self.max_context else "max_tokens"
            raise ContextLengthExceeded(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context length of {self.max_context} tokens", param=param)
        seq = Sequence.create(request.id, prompt, params, self.cfg.eos_ids,
                              request.arrival or time.monotonic(), self.device)
        if params.structured is not None:
            if self.grammars is None:
                raise InvalidInput("structured outputs need the model's tokenizer, which this "
                                   "engine was not given", code="invalid_grammar",
                                   param="response_format")
            seq.matcher = self.grammars.matcher(params.structured)
            for tok in prompt[len(prompt) - params.resume:]:   # a failover: re-advance it
                if not seq.matcher.consume_token(tok):
                    raise InvalidInput("the resumed tokens do not match the grammar",
                                       code="invalid_grammar", param="resume")
        if request.traced:
            seq.timing = SeqTiming()
        self._seqs[request.id] = seq
        self.scheduler.add(seq)

    def _check_prompt(self, ids: Any) -> list[int]:
        if not isinstance(ids, (list, tuple)) or not ids:
            raise InvalidInput("the prompt must be a non-empty list of token ids",
                               param="prompt_ids")
        if not all(type(t) is int for t in ids):       # numpy ints are fine, bools are not
            try:
                if any(isinstance(t, bool) for t in ids):
                    raise TypeError("bool")
                ids = [operator.index(t) for t in ids]
            except TypeError as exc:
                raise InvalidInput("token ids must be integers", param="prompt_ids") from exc
        vocab = self.cfg.vocab_size
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise InvalidInput(f"token id {bad} is outside the vocabulary [0, {vocab})",
                               param="prompt_ids")
        return list(ids)

    def has_work(self) -> bool:
        return self.scheduler.has_work() if self.model is not None else False

    def cancel(self, request_id: str) -> list[TokenOutput]:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return []
        self.scheduler.abort(seq)
        out = TokenOutput(request_id, [], finished=True, finish_reason="cancelled")
        self._first_output(seq, out)
        if seq.timing is not None:
            out.timing = seq.timing.wire(seq.arrival, time.monotonic())
        return [out]

    # -- the step ----------------------------------------------------------------------------

    def step(self) -> list[TokenOutput]:
        try:
            return self._step()
        finally:
            if self.kv_events is not None and self._kv_log is not None:
                # what this step put into and took out of the prefix cache, as one batch
                if events := self._kv_log.drain():
                    self.kv_events.publish(time.time(), events)

    def _step(self) -> list[TokenOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        rows = batch.sample_rows
        masks = self._start_masks([batch.seqs[r] for r in rows])
        try:
            # one deterministic request makes the whole step batch-invariant: its rows then
            # cannot depend on the others
            fb = self._forward_batch(batch)
            if self.deterministic or any(s.params.deterministic for s in batch.seqs):
                logits = self.model(fb, self.kv, deterministic=True)     # [B, V]
            else:
                logits = self.model(fb, self.kv)
            if len(rows) != len(batch.seqs):
                logits = logits[rows]
            allowed = masks.result() if masks is not None else None
            sampled = self.sampler(logits, [batch.seqs[r] for r in rows],
                                   allowed) if rows else None
        except (RuntimeError, ValueError, IndexError) as exc:
            # Out of memory or a kernel error: fail this batch, keep the engine serving.
            if masks is not None:
                masks.cancel() or masks.exception()     # let it finish before the release
            return self._fail(batch, exc)
        self._counters["steps"] += 1
        if sampled is None:
            self.scheduler.update(batch, [])
            return []
        reasons = self.scheduler.update(batch, sampled.token_ids)
        self._counters["tokens_generated"] += len(rows)
        return self._outputs(batch, sampled.token_ids, sampled.logprobs, reasons, sampled.top)

    def _start_masks(self, seqs: list[Sequence]) -> Future[Any] | None:
        """The grammar masks of the constrained rows, computed in a thread while the forward
        pass runs (llguidance releases the GIL, as torch's kernels do)."""
        matchers = [s.matcher for s in seqs if s.matcher is not None]
        if not matchers:
            return None
        if self._mask_pool is None:
            self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="ferry-grammar")
        return self._mask_pool.submit(allowed_tokens, matchers, self.cfg.vocab_size)

    def _forward_batch(self, batch: ScheduledBatch) -> ForwardBatch:
        tokens: list[int] = []
        positions: list[int] = []
        ctx: list[int] = []
        prompt_part = 0
        now = time.monotonic()
        for seq, n in zip(batch.seqs, batch.num_new):
            c = seq.num_computed
            if seq.timing is not None:
                seq.timing.step(now, c < seq.num_prompt)
            tokens.extend(seq.token_ids[c:c + n])
            positions.extend(range(c, c + n))
            ctx.append(c + n)
            if c < seq.num_prompt:
                prompt_part += min(c + n, seq.num_prompt) - c
        self._counters["tokens_computed"] += len(tokens)
        self._counters["prompt_tokens_computed"] += prompt_part
        dev = self.device
        return ForwardBatch(torch.tensor(tokens, dtype=torch.int64, device=dev),
                            torch.tensor(positions, dtype=torch.int64, device=dev),
                            list(batch.num_new), ctx, [s.block_table for s in batch.seqs])

    def _outputs(self, batch: ScheduledBatch, tokens: list[int], logprobs: list[float] | None,
                 reasons: list[str | None],
                 top: list[list[tuple[int, float]]] | None = None) -> list[TokenOutput]:
        outs = []
        now = time.monotonic()
        for j, row in enumerate(batch.sample_rows):
            seq = batch.seqs[row]
            reason = reasons[j]
            lp = [logprobs[j]] if logprobs is not None and seq.params.logprobs else None
            out = TokenOutput(seq.id, [tokens[j]], lp, reason is not None, reason)
            if top is not None and seq.params.top_logprobs:
                out.top_logprobs = [top[j]]
            self._record_latency(seq, now, reason is not None)
            if seq.timing is not None:
                if not seq.timing.first_token:
                    seq.timing.first_token = now
                if reason is not None:
                    out.timing = seq.timing.wire(seq.arrival, now)
            self._first_output(seq, out)
            if reason is not None:
                del self._seqs[seq.id]
            outs.append(out)
        return outs

    def _record_latency(self, seq: Sequence, now: float, finished: bool) -> None:
        if not seq.first_emitted:
            self.latency.ttft.observe(now - seq.arrival)
            self._counters["prompt_tokens"] += seq.num_prompt
        else:
            self.latency.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if finished:
            self.latency.e2e.observe(now - seq.arrival)

    @staticmethod
    def _first_output(seq: Sequence, out: TokenOutput) -> None:
        if not seq.first_emitted:
            seq.first_emitted = True
            out.prompt_tokens = seq.num_prompt
            out.cached_tokens = seq.num_cached

    def _fail(self, batch: ScheduledBatch, exc: Exception) -> list[TokenOutput]:
        log.exception("forward pass over %d sequences failed", len(batch.seqs))
        self._counters["forward_errors"] += 1
        self.scheduler.fail(batch)
        err = InternalError(f"generation failed: {exc}")
        outs = []
        for seq in batch.seqs:
            self._seqs.pop(seq.id, None)
            outs.append(TokenOutput(seq.id, [], finished=True, finish_reason="error", error=err))
        return outs

    # -- stats -------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        if self.model is None:
            return {}
        pool = self.pool.stats()
        return {
            "kv_blocks_total": pool.total, "kv_blocks_free": pool.free,
            "kv_blocks_used": pool.used, "kv_blocks_cached": pool.cached,
            "prefix_cache_hit_rate": pool.hit_rate,
            "prefix_cache_query_tokens": pool.query_tokens,
            "prefix_cache_hit_tokens": pool.hit_tokens,
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "oldest_waiting_s": self.scheduler.oldest_wait(time.monotonic()),
            "block_size": self.pool.block_size, "latency": self.latency.to_wire(),
            "max_num_seqs": self.scheduler.cfg.max_num_seqs,
            "preemptions": self.scheduler.num_preemptions, **self._counters,
        }


def _env_threads() -> int:
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return 0
    if not raw.isdigit():
        raise ModelLoadFailed(f"{THREADS_ENV}={raw!r} must be a non-negative integer",
                              param=THREADS_ENV)
    return int(raw)
