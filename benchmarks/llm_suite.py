"""SmolLM2 streaming: Ferry vs llama.cpp's server vs a naive one-at-a-time baseline.

All systems load the same GGUF file (SmolLM2-135M-Instruct Q4_1), use 2 threads, render the
chat template from the GGUF, decode greedily and ignore end-of-sequence so every request yields
exactly `max_tokens` tokens; all are driven through OpenAI `/v1/chat/completions` SSE by the
same generator. Every request has its own user message (no shared prefix beyond the template's
default system prompt), so prefix caching cannot inflate the throughput numbers.

- `round_robin`: closed loop at concurrency 1/4/16, the systems taking turns: aggregate output
  tokens/s, TTFT, ITL, TPOT;
- `prefix`: TTFT of a request whose ~1k-token system prompt was seen before (hit) vs one whose
  system prompt is new (miss), one request at a time.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from benchmarks import targets as T
from benchmarks.loadgen import LoadError, Report, run_closed

__all__ = ["LLMConfig", "story_messages", "long_system_prompt", "round_robin", "prefix_runs"]

log = logging.getLogger(__name__)

_TOPICS = ("a river ferry", "a lighthouse keeper", "a night train", "a mountain village",
           "a lost key", "a clockmaker", "an old map", "a winter market", "a paper boat",
           "a quiet harbour", "a kite festival", "a bakery at dawn", "a library cat",
           "a bridge builder", "a garden robot", "a glass of tea")


def story_messages(i: int) -> list[dict[str, str]]:
    topic = _TOPICS[i % len(_TOPICS)]
    return [{"role": "user", "content": f"Story {i}: write a short story about {topic}."}]


def long_system_prompt(seed: str, words: int) -> str:
    """A deterministic ~`words`-word system prompt; `seed` changes its first words, so two
    seeds share no prefix."""
    rules = [f"Rule {k}: always answer politely, cite the ferry timetable section {k * 7 % 97}, "
             f"and never mention route {k * 13 % 89} unless asked." for k in range(words // 18 + 1)]
    return f"Session {seed}. You are the assistant of the harbour office. " + " ".join(rules)


@dataclass(slots=True)
class LLMConfig:
    max_tokens: int = 64
    concurrency: tuple[int, ...] = (1, 4, 16)
    rounds: int = 2                   # each level runs this many times per system, interleaved
    prefix_trials: int = 4
    prefix_words: int = 620           # ≈ 1,000 tokens of system prompt


async def round_robin(targets: list[Any], cfg: LLMConfig) -> dict[str, list[Report]]:
    """Every concurrency level on every target, `cfg.rounds` times, the targets taking turns
    (A B C A B C …) so that noise from the rest of the machine lands on all of them alike.
    One round at level c sends max(3, c) requests. A target whose warm-up fails is dropped
    (LoadError recorded as its result); failed requests inside a level are kept and counted."""
    live, out = [], {}
    for t in targets:
        await t.open()
        try:
            (await run_closed(t, 1, requests=1, timeout_s=600.0, first_index=90_000)).check()
            live.append(t)
        except LoadError as exc:
            log.error("%s: %s", t.name, exc)
            out[t.name] = exc
    try:
        runs: dict[tuple[str, int], list[Report]] = {}
        for k, c in enumerate(cfg.concurrency):
            for rnd in range(cfg.rounds):
                for t in live:
                    rep = await run_closed(t, c, requests=max(3, c), timeout_s=600.0,
                                           first_index=k * 1000 + rnd * 100)
                    log.info("round %d %s", rnd, rep.line())
                    runs.setdefault((t.name, c), []).append(rep)
        for t in live:
            out[t.name] = [Report.merge(t, runs[(t.name, c)]) for c in cfg.concurrency]
    finally:
        for t in targets:
            await t.close()
    return out


async def prefix_runs(base_url: str, model: str, extra: dict[str, Any], cfg: LLMConfig,
                      name: str) -> dict[str, Any]:
    """Sequential pairs: a miss (a system prompt never seen), then a hit (the same system
    prompt, another question). TTFT of each, in ms."""
    salt = uuid.uuid4().hex[:8]          # a new run never hits what an earlier run cached

    def messages(i: int) -> list[dict[str, str]]:
        trial, second = divmod(i, 2)
        system = long_system_prompt(f"{salt}-{trial}", cfg.prefix_words)
        question = "When does the first ferry leave?" if not second else \
            "Which routes run on Sundays?"
        return [{"role": "system", "content": system}, {"role": "user", "content": question}]

    target = T.ChatStream(name, base_url, model, messages, max_tokens=4, extra=extra)
    await target.open()
    try:
        miss, hit = [], []
        for trial in range(cfg.prefix_trials):
            for second in (0, 1):
                rep = await run_closed(target, 1, requests=1, timeout_s=600.0,
                                       first_index=2 * trial + second)
                rep.check()
                (hit if second else miss).append(rep.ttft_ms["p50"])
    finally:
        await target.close()
    return {"miss_ttft_ms": miss, "hit_ttft_ms": hit,
            "miss_p50_ms": sorted(miss)[len(miss) // 2], "hit_p50_ms": sorted(hit)[len(hit) // 2]}
