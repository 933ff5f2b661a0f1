"""The engine-side numbers behind vLLM's metric names: token counts, TTFT / ITL / e2e histograms
recorded at the token events, and the age of the oldest queued request."""
from __future__ import annotations

import pytest

from engines.base import GenerateRequest
from engines.llm.latency import Histogram
from tests.unit.test_llm_engine import drain, greedy, make_engine, model  # noqa: F401

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]


def _count(h: dict) -> int:
    return sum(h["counts"])


def test_histogram_buckets_follow_prometheus_le():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(v)
    assert h.counts == [2, 2, 1] and h.total == pytest.approx(8.65)


def test_token_counts_and_latencies_per_request(model):  # noqa: F811
    engine = make_engine(model)
    prompts = {"a": ([1, 2, 3, 4, 5], 4), "b": ([1, 9, 8], 6), "c": ([1, 7] * 6, 1)}
    for rid, (prompt, n) in prompts.items():
        engine.submit(GenerateRequest(rid, prompt, greedy(n)))
    engine.submit(GenerateRequest("gone", [1, 2, 3], greedy(5)))
    engine.cancel("gone")                 # never produced a token: not counted anywhere
    drain(engine)
    s = engine.stats()
    assert s["prompt_tokens"] == sum(len(p) for p, _ in prompts.values())
    assert s["tokens_generated"] == sum(n for _, n in prompts.values())
    lat = s["latency"]
    assert _count(lat["ttft"]) == 3 and _count(lat["e2e"]) == 3
    assert _count(lat["itl"]) == sum(n - 1 for _, n in prompts.values())
    assert 0 < lat["ttft"]["sum"] < lat["e2e"]["sum"]
    assert s["max_num_seqs"] == 32 and s["block_size"] == 4


def test_oldest_wait_counts_only_requests_never_admitted(model):  # noqa: F811
    engine = make_engine(model, max_num_seqs=1, max_batched_tokens=8)
    engine.submit(GenerateRequest("run", [1, 2, 3], greedy(3), arrival=1.0))
    engine.submit(GenerateRequest("wait", [1, 2, 4], greedy(3), arrival=2.0))
    assert engine.scheduler.oldest_wait(10.0) == 9.0
    engine.step()                          # "run" admitted, "wait" still queued
    assert engine.scheduler.oldest_wait(10.0) == 8.0
    assert engine.stats()["waiting"] == 1 and engine.stats()["oldest_waiting_s"] > 0
    drain(engine)
    assert engine.scheduler.oldest_wait(10.0) == 0.0
