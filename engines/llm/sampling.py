"""Sampling parameters and a sampler vectorised over the batch.

Processing order per row, all in float32 on the logits' device:
  0. a row under a grammar (structured outputs) keeps only the tokens its matcher allows; a
     row short of its min_tokens cannot draw its stop tokens (eos, stop_token_ids);
  1. repetition penalty over prompt + generated tokens (HF/vLLM rule: positive logits divided,
     negative ones multiplied), then OpenAI presence/frequency penalties over generated tokens;
  2. temperature (rows with temperature 0 are greedy and keep their logits);
  3. top-k and min-p (relative to the most likely token) truncation, as -inf masks;
  4. greedy rows take the argmax; the others draw by inverse CDF, one uniform number per draw,
     taken from the request's own `torch.Generator` when it is seeded (re-seeded each step from
     (seed, output position), so a resumed request continues as the uninterrupted one);
  5. top-p (nucleus) by rejection: a draw is kept when the mass of the tokens more likely than
     it is at most top_p, else redrawn. Accepted draws follow exactly the renormalised nucleus,
     without sorting the vocabulary (~3 ms per row on a CPU); acceptance is at least top_p, and
     rows still rejected after a few tries fall back to the sort.
Every row's random numbers depend only on its own distribution and generator, so seeded output
does not depend on which other requests share the batch.

Returned logprobs are `log_softmax` of the logits after steps 1-2 and before truncation (vLLM's
"processed" mode): truncation would renormalise and report log(1) = 0 for top_k=1.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from daemon.errors import InvalidInput
from engines.llm.grammar import allowed_tokens, check_structured

__all__ = ["SamplingParams", "SamplingRow", "SampleOutput", "Sampler", "GREEDY_EPS"]

MAX_TOP_LOGPROBS = 20       # as OpenAI
GREEDY_EPS = 1e-5            # temperatures below this are greedy (as in vLLM)
_NUCLEUS_TRIES = 4           # top-p rejection rounds before the sort fallback
_MAX_TEMPERATURE = 100.0


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1                      # -1 or 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    # EOS and stop_token_ids cannot end the output before this many tokens (vLLM's min_tokens;
    # a row under a grammar ends when its grammar does)
    min_tokens: int = 0
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0                # also return this many most likely tokens (0..20)
    structured: dict[str, Any] | None = None   # a constraint (engines/llm/grammar.py)
    # Failover (frontends/dispatch.py): the prompt's last `resume` tokens are output an earlier
    # engine already delivered. They count as output for max_tokens, the penalties, the grammar
    # and the seed's positions, so the continuation draws what the uninterrupted run would have.
    resume: int = 0
    # batch-invariant: this request's tokens do not depend on batch company or on prefix-cache
    # hits (LlamaModel.forward's `deterministic`; slower); implied by [llm] deterministic
    deterministic: bool = False

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise `InvalidInput` naming the first bad parameter."""
        def bad(param: str, why: str) -> InvalidInput:
            return InvalidInput(f"{param} {why}, got {getattr(self, param)!r}", param=param)

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer >= 1")
        if not _is_num(self.temperature) or not 0.0 <= self.temperature <= _MAX_TEMPERATURE:
            raise bad("temperature", f"must be a number in [0, {_MAX_TEMPERATURE:g}]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be an integer >= -1 (-1 or 0 disables it)")
        if not _is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be a number in (0, 1]")
        if not _is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be a number in [0, 1]")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0.0:
            raise bad("repetition_penalty", "must be a number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_num(value) or not -2.0 <= value <= 2.0:
                raise bad(name, "must be a number in [-2, 2]")
        self._validate_stops(vocab_size)
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be a boolean")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", "must be an integer in [0, max_tokens]")
        if not isinstance(self.logprobs, bool):
            raise bad("logprobs", "must be a boolean")
        if not isinstance(self.deterministic, bool):
            raise bad("deterministic", "must be a boolean")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", "must be an integer in [0, 2**63) or null")
        if not _is_int(self.resume) or not 0 <= self.resume < self.max_tokens:
            raise bad("resume", "must be an integer in [0, max_tokens)")
        check_structured(self.structured)

    def _validate_stops(self, vocab_size: int | None) -> None:
        stops = self.stop_token_ids
        if not isinstance(stops, (list, tuple)) or not all(_is_int(t) for t in stops):
            raise InvalidInput(f"stop_token_ids must be a list of integers, got {stops!r}",
                               param="stop_token_ids")
        hi = vocab_size if vocab_size is not None else 2**63
        for t in stops:
            if not 0 <= t < hi:
                raise InvalidInput(f"stop_token_ids holds {t}, outside the vocabulary [0, {hi})",
                                   param="stop_token_ids")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


class SamplingRow(Protocol):
    """What the sampler reads from a sequence (engines.llm.sequence.Sequence has these)."""

    params: SamplingParams
    token_ids: list[int]             # prompt + generated
    num_prompt: int
    generator: torch.Generator | None
    matcher: Any                     # a grammar matcher (engines/llm/grammar.py) or None
    stop_ids: frozenset[int]         # the tokens that end it (eos unless ignored, stop ids)


@dataclass(slots=True)
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float] | None     # None when no row asked for logprobs
    # per row, its top_logprobs most likely (token, logprob), best first; None: none asked
    top: list[list[tuple[int, float]]] | None = None


class Sampler:
    """Turns next-token logits of a batch into token ids; one call per engine step."""

    def __init__(self, device: str | torch.device = "cpu", seed: int | None = None) -> None:
        self.device = torch.device(device)
        self._gen = torch.Generator(device=self.device)
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        self._gen.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                 allowed: np.ndarray | None = None) -> SampleOutput:
        """`logits` [B, V] (left unchanged), one row per entry of `rows`; `allowed`: the
        grammar masks of the constrained rows, in order, if already computed."""
        params = [r.params for r in rows]
        matchers = [getattr(r, "matcher", None) for r in rows]
        if any(m is not None for m in matchers):     # constrained rows: allowed tokens only
            logits = _apply_masks(logits, matchers, allowed)
        early = [i for i, (r, m) in enumerate(zip(rows, matchers))
                 if m is None and len(r.token_ids) - r.num_prompt < r.params.min_tokens
                 and r.stop_ids]
        if early:                                    # min_tokens: no end before it
            logits = _hold_stops(logits, rows, early)
        if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
               for p in params):
            logits = _apply_penalties(logits.float(), rows)
        greedy = [p.temperature < GREEDY_EPS for p in params]
        want_lp = any(p.logprobs or p.top_logprobs for p in params)
        if all(greedy):
            ids = logits.argmax(dim=-1)                                  # [B]
            if not want_lp:
                return SampleOutput(ids.tolist(), None)
            logp = torch.log_softmax(logits.float(), dim=-1)
            return SampleOutput(ids.tolist(), logp.gather(1, ids[:, None]).squeeze(1).tolist(),
                                _top(logp, params))

        logits = logits.float()
        temps = [1.0 if g else p.temperature for g, p in zip(greedy, params)]
        if any(t != 1.0 for t in temps):
            logits = logits / _column(temps, logits)
        logp = torch.log_softmax(logits, dim=-1) if want_lp else None   # [B, V]
        greedy_ids = logits.argmax(dim=-1) if any(greedy) else None
        logits = _truncate(logits, params)
        for r, g in zip(rows, greedy):
            if r.generator is not None and not g and r.params.seed is not None:
                # a seeded row's draws depend on (seed, output position) only: a resumed
                # sequence (params.resume) continues exactly as the uninterrupted one
                r.generator.manual_seed(_position_seed(r.params.seed,
                                                       len(r.token_ids) - r.num_prompt))
        ids = self._draw(logits, rows, greedy)
        if greedy_ids is not None:
            ids = torch.where(torch.tensor(greedy, device=logits.device), greedy_ids, ids)
        if logp is None:
            return SampleOutput(ids.tolist(), None)
        return SampleOutput(ids.tolist(), logp.gather(1, ids[:, None]).squeeze(1).tolist(),
                            _top(logp, params))

    def _draw(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
              greedy: list[bool]) -> torch.Tensor:
        """One token per row from softmax(logits), top-p applied by rejection. [B]"""
        probs = torch.softmax(logits, dim=-1)                            # [B, V]
        cdf = probs.cumsum(dim=-1)                                       # [B, V]
        ids = self._search(cdf, rows, list(range(len(rows))))
        pending = [i for i, r in enumerate(rows) if r.params.top_p < 1.0 and not greedy[i]]
        for attempt in range(_NUCLEUS_TRIES):
            if pending:
                pending = _outside_nucleus(probs, cdf, ids, rows, pending)
            if not pending:
                return ids
            if attempt + 1 < _NUCLEUS_TRIES:
                ids[pending] = self._search(cdf, rows, pending)
        # Low acceptance (a small top_p over a flat distribution): cut exactly by sorting.
        idx = torch.tensor(pending, device=logits.device)
        top_p = _column([rows[i].params.top_p for i in pending], logits)
        cut = torch.softmax(_top_p_sorted(logits[idx], top_p), dim=-1).cumsum_(dim=-1)
        ids[idx] = self._search(cut, [rows[i] for i in pending], list(range(len(pending))))
        return ids

    def _search(self, cdf: torch.Tensor, rows: Sequence[SamplingRow],
                which: list[int]) -> torch.Tensor:
        """Inverse-CDF draws for rows `which` of `cdf` ([B, V]), one uniform number each."""
        u = torch.rand(len(which), generator=self._gen, device=self.device)   # [R]
        for j, i in enumerate(which):
            gen = rows[i].generator
            if gen is not None:
                u[j] = torch.rand((), generator=gen, device=self.device)
        sub = cdf if len(which) == cdf.shape[0] else cdf[which]           # [R, V]
        target = (u * sub[:, -1])[:, None]                               # [R, 1]
        # right=True: the first index whose cdf exceeds the target, so zero-probability tokens
        # (flat cdf steps) are never chosen.
        ids = torch.searchsorted(sub, target, right=True).squeeze(1)     # [R]
        return ids.clamp_(max=cdf.shape[-1] - 1)


def _position_seed(seed: int, position: int) -> int:
    """A 63-bit seed for output position `position` of a request seeded with `seed`."""
    return (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def _top(logp: torch.Tensor, params: list[SamplingParams]
         ) -> list[list[tuple[int, float]]] | None:
    """Each row's top_logprobs most likely tokens of `logp` [B, V], best first."""
    k = max(p.top_logprobs for p in params)
    if k == 0:
        return None
    values, ids = logp.topk(k, dim=-1)                                   # [B, k]
    return [list(zip(i[:p.top_logprobs], v[:p.top_logprobs]))
            for i, v, p in zip(ids.tolist(), values.tolist(), params)]


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-row values as a [B, 1] float32 column on `like`'s device."""
    return torch.tensor(values, dtype=torch.float32, device=like.device)[:, None]


def _apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition penalty over prompt + output; presence/frequency over output. [B, V]

    Works on the (row, token) pairs that occur, never on full [B, V] masks: histories are
    short next to a 50k vocabulary.
    """
    dev = logits.device
    logits = logits.clone()
    rep = [r.params.repetition_penalty for r in rows]
    if any(p != 1.0 for p in rep):
        ri: list[int] = []
        ci: list[int] = []
        for i, r in enumerate(rows):
            if rep[i] != 1.0:
                seen = set(r.token_ids)
                ri.extend([i] * len(seen))
                ci.extend(seen)
        idx = (torch.tensor(ri, device=dev), torch.tensor(ci, device=dev))
        pen = torch.tensor(rep, dtype=logits.dtype, device=dev)[idx[0]]           # [N]
        vals = logits[idx]                                                          # [N]
        logits[idx] = torch.where(vals > 0, vals / pen, vals * pen)
    pres = [r.params.presence_penalty for r in rows]
    freq = [r.params.frequency_penalty for r in rows]
    if any(pres) or any(freq):
        ri, ci, fi = [], [], []
        for i, r in enumerate(rows):
            if not (pres[i] or freq[i]):
                continue
            counts: dict[int, int] = {}
            for t in r.token_ids[r.num_prompt:]:
                counts[t] = counts.get(t, 0) + 1
            ri.extend([i] * len(counts))
            ci.extend(counts)
            fi.extend(freq[i] * c + pres[i] for c in counts.values())
        if ci:
            idx = (torch.tensor(ri, device=dev), torch.tensor(ci, device=dev))
            logits[idx] -= torch.tensor(fi, dtype=logits.dtype, device=dev)
    return logits


def _truncate(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Top-k and min-p as -inf masks; rows that disable a filter are left alone. [B, V]

    Both cut at a logit threshold, so tokens tied with the last kept one are kept too.
    """
    V = logits.shape[-1]
    ninf = float("-inf")
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    if any(k < V for k in ks):
        width = max(k for k in ks if k < V)
        top = logits.topk(width, dim=-1).values                          # [B, W] descending
        k_idx = torch.tensor([min(k, width) - 1 for k in ks], device=logits.device)
        kth = top.gather(1, k_idx[:, None])                              # [B, 1]
        k_off = torch.tensor([k >= V for k in ks], device=logits.device)[:, None]
        logits = logits.masked_fill((logits < kth) & ~k_off, ninf)
    if any(p.min_p > 0.0 for p in params):
        log_min_p = _column([math.log(p.min_p) if p.min_p > 0 else ninf for p in params], logits)
        floor = logits.max(dim=-1, keepdim=True).values + log_min_p      # [B, 1]
        logits = logits.masked_fill(logits < floor, ninf)
    return logits


def _outside_nucleus(probs: torch.Tensor, cdf: torch.Tensor, ids: torch.Tensor,
                     rows: Sequence[SamplingRow], which: list[int]) -> list[int]:
    """Rows of `which` whose drawn token lies outside their top-p nucleus.

    A token is inside when the mass of the tokens strictly more likely than it is at most
    top_p: the same set a descending sort keeps ("drop once the mass before it exceeds
    top_p"), with ties to the last kept token kept.
    """
    if len(which) == probs.shape[0]:                                    # all rows: no copies
        p, chosen_ids, total = probs, ids, cdf[:, -1]
    else:
        idx = torch.tensor(which, device=probs.device)
        p, chosen_ids, total = probs[idx], ids[idx], cdf[idx, -1]       # [R, V], [R], [R]
    chosen = p.gather(1, chosen_ids[:, None])                           # [R, 1]
    above = (p * (p > chosen)).sum(dim=-1)                              # [R]
    limit = _column([rows[i].params.top_p for i in which], p).squeeze(1) * total
    outside = (above > limit).tolist()
    return [i for i, out in zip(which, outside) if out]


def _top_p_sorted(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Exact nucleus by sorting ([R, V], top_p [R, 1]); the most likely token always stays."""
    srt, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(srt, dim=-1)
    drop = (probs.cumsum(dim=-1) - probs) > top_p                       # [R, V] sorted
    return logits.masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), float("-inf"))


def _hold_stops(logits: torch.Tensor, rows: Sequence[SamplingRow], early: list[int]
                ) -> torch.Tensor:
    """-inf on the stop tokens of the rows in `early` (a new tensor). [B, V]"""
    out = logits.clone()
    vocab = out.shape[-1]
    for i in early:
        ids = [t for t in rows[i].stop_ids if 0 <= t < vocab]
        if ids:
            out[i, ids] = float("-inf")
    return out


def _apply_masks(logits: torch.Tensor, matchers: list[Any],
                 allowed: np.ndarray | None) -> torch.Tensor:
    """`logits` [B, V] with, in each row whose matcher is not None, every token it does not
    allow set to -inf (a new tensor). `allowed` holds the constrained rows' masks in order,
    when the engine computed them beside the forward pass; else they are computed here."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    vocab = logits.shape[-1]
    if allowed is None:
        allowed = allowed_tokens([matchers[i] for i in rows], vocab)
    keep = allowed.any(axis=1)          # a row with nothing allowed: its stop token ends it
    out = logits.float().clone()
    if keep.any():
        idx = torch.tensor([r for r, k in zip(rows, keep) if k], device=out.device)
        banned = torch.from_numpy(~allowed[keep]).to(out.device)
        out[idx] = out[idx].masked_fill(banned, float("-inf"))
    return out
