"""The load generator's counting, timing and failure reporting (benchmarks/loadgen.py), the
SSE stream target against a real local HTTP server, and the RESULTS.md splice."""
from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from benchmarks import loadgen as L
from benchmarks import targets as T
from benchmarks.pyspy import summarise
from benchmarks.results_md import BEGIN, END, splice

pytestmark = pytest.mark.timeout(60)


class CountingTarget:
    """Answers after `delay_s`; fails request numbers in `fail`; tracks concurrency."""

    name, streaming = "counting", False

    def __init__(self, delay_s: float = 0.002, fail: set[int] | None = None) -> None:
        self.delay_s, self.fail = delay_s, fail or set()
        self.seen: list[int] = []
        self.inflight = self.peak = 0

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def call(self, i: int) -> L.Outcome:
        self.seen.append(i)
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            await asyncio.sleep(self.delay_s)
            if i in self.fail:
                raise RuntimeError(f"request {i} refused")
            return L.Outcome()
        finally:
            self.inflight -= 1


def test_closed_loop_sends_exactly_n_and_holds_concurrency():
    t = CountingTarget()
    rep = asyncio.run(L.run_closed(t, 5, requests=37, warmup=2))
    assert (rep.requests, rep.completed, rep.errors) == (37, 37, 0)
    assert sorted(i for i in t.seen if i >= 0) == list(range(37))     # each index once
    assert t.peak == 5
    assert rep.latency_ms["p50"] >= 2.0 * 0.9          # the target's own 2 ms delay
    assert rep.throughput_rps == pytest.approx(37 / rep.duration_s)
    assert rep.check() is rep


def test_failures_are_counted_and_check_raises():
    t = CountingTarget(fail={3, 4, 10})
    rep = asyncio.run(L.run_closed(t, 2, requests=12))
    assert (rep.completed, rep.errors) == (9, 3)
    assert any("request 3 refused" in e for e in rep.error_examples)
    with pytest.raises(L.LoadError, match="3 of 12"):
        rep.check()


def test_failed_warmup_raises_before_measuring():
    t = CountingTarget(fail={-1})
    with pytest.raises(L.LoadError, match="warm-up"):
        asyncio.run(L.run_closed(t, 1, requests=5, warmup=1))


def test_timeouts_are_errors():
    t = CountingTarget(delay_s=1.0)
    rep = asyncio.run(L.run_closed(t, 2, requests=2, timeout_s=0.05))
    assert rep.errors == 2 and "timeout" in rep.error_examples[0]


def test_closed_loop_needs_a_stop_condition():
    with pytest.raises(ValueError):
        asyncio.run(L.run_closed(CountingTarget(), 1))


def test_poisson_arrivals_rate_and_determinism():
    a = L.poisson_arrivals(200.0, requests=4000, seed=3)
    assert a == L.poisson_arrivals(200.0, requests=4000, seed=3)
    assert len(a) == 4000 and all(x < y for x, y in zip(a, a[1:]))
    assert 4000 / a[-1] == pytest.approx(200.0, rel=0.06)
    b = L.poisson_arrivals(50.0, duration_s=2.0, seed=1)
    assert b[-1] < 2.0 and 70 <= len(b) <= 130


def test_open_loop_counts_latency_from_the_scheduled_time():
    # One server slot, 10 ms per request, offered 400/s: requests queue, and the queueing
    # shows in latency because it is measured from each request's scheduled arrival.
    lock = asyncio.Lock()

    class Serial(CountingTarget):
        async def call(self, i: int) -> L.Outcome:
            async with lock:
                return await super().call(i)

    rep = asyncio.run(L.run_open(Serial(delay_s=0.01), 400.0, requests=40, seed=0))
    assert rep.completed == 40 and rep.mode == "open"
    assert rep.latency_ms["max"] > 100          # the last ones waited behind ~30 others
    assert rep.throughput_rps < 120


def test_stream_metrics_from_token_times():
    class Stream:
        name, streaming = "stream", True

        async def open(self) -> None: ...

        async def close(self) -> None: ...

        async def call(self, i: int) -> L.Outcome:
            times = []
            for _ in range(5):
                await asyncio.sleep(0.01)
                times.append(time.perf_counter())
            return L.Outcome(tokens=5, token_times=times)

    rep = asyncio.run(L.run_closed(Stream(), 2, requests=4))
    assert rep.output_tokens == 20
    assert rep.ttft_ms["p50"] >= 9
    assert 9 <= rep.itl_ms["p50"] <= 60 and 9 <= rep.tpot_ms["p50"] <= 60
    assert rep.tokens_per_s == pytest.approx(20 / rep.duration_s)


def test_best_under_bound_picks_the_fastest_run_within_it():
    def rep(rps: float, p99: float, errors: int = 0) -> L.Report:
        return L.Report("x", "open", None, rps, 10, 10 - errors, errors, 1.0, rps,
                        {"p50": 1.0, "p90": 1.0, "p99": p99, "max": p99, "mean": 1.0})
    runs = [rep(10, 5), rep(20, 9), rep(30, 11), rep(25, 8, errors=1)]
    assert L.best_under_bound(runs, 10.0).throughput_rps == 20
    assert L.best_under_bound(runs[2:], 10.0) is None


def test_percentiles():
    p = L.percentiles([0.001 * k for k in range(1, 101)])
    assert p["p50"] == pytest.approx(50.5) and p["max"] == pytest.approx(100.0)
    assert L.percentiles([]) is None


def test_kserve_bodies():
    x = {"ids": np.arange(6, dtype=np.int64).reshape(2, 3)}
    body = json.loads(T.kserve_json_body(x))
    assert body["inputs"][0] == {"name": "ids", "datatype": "INT64", "shape": [2, 3],
                                 "data": [0, 1, 2, 3, 4, 5]}
    raw, headers = T.kserve_binary_body(x)
    n = int(headers["Inference-Header-Content-Length"])
    assert json.loads(raw[:n])["inputs"][0]["parameters"]["binary_data_size"] == 48
    assert np.frombuffer(raw[n:], np.int64).tolist() == list(range(6))


def _sse_app(chunks: list[bytes], status: int = 200):
    from aiohttp import web

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=status)
        await resp.prepare(request)
        for c in chunks:
            await resp.write(c)
        return resp
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    return app


async def _against(app, call):
    from aiohttp import web
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await call(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def _chunk(text: str | None = None, usage: dict | None = None) -> bytes:
    body: dict = {"choices": [{"delta": {"content": text} if text else {}}]}
    if usage:
        body = {"choices": [], "usage": usage}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _stream_run(app, requests: int = 3) -> L.Report:
    async def call(url: str) -> L.Report:
        t = T.ChatStream("sse", url, "m", lambda i: [{"role": "user", "content": str(i)}],
                         max_tokens=3)
        await t.open()
        try:
            return await L.run_closed(t, 2, requests=requests)
        finally:
            await t.close()
    return asyncio.run(_against(app, call))


def test_chat_stream_counts_tokens_from_usage():
    chunks = [_chunk("a"), _chunk("b"), _chunk("c"),
              _chunk(usage={"completion_tokens": 3}), b"data: [DONE]\n\n"]
    rep = _stream_run(_sse_app(chunks)).check()
    assert rep.completed == 3 and rep.output_tokens == 9
    assert rep.ttft_ms is not None and rep.itl_ms is not None


@pytest.mark.parametrize("chunks,status,why", [
    ([_chunk("a"), b'data: {"error": {"message": "boom"}}\n\n'], 200, "error event"),
    ([_chunk("a")], 200, "without \\[DONE\\]"),
    ([b"data: [DONE]\n\n"], 200, "no text"),
    ([b'{"error": "nope"}'], 500, "HTTP 500"),
])
def test_chat_stream_failures_are_errors(chunks, status, why):
    rep = _stream_run(_sse_app(chunks, status), requests=2)
    assert rep.errors == 2
    with pytest.raises(L.LoadError, match=why):
        rep.check()


def test_results_splice_keeps_other_sections():
    page = f"# Results\n\n## Transport\ntable\n\n{BEGIN}\nold\n{END}\n\n## Later\nkept\n"
    out = splice(page, "new section")
    assert "## Transport\ntable" in out and "## Later\nkept" in out
    assert "old" not in out and f"{BEGIN}\nnew section\n{END}" in out
    assert splice(splice(page, "x"), "y").count(BEGIN) == 1
    appended = splice("# Results\n", "first")
    assert appended.startswith("# Results\n") and appended.rstrip().endswith(END)


def test_pyspy_summary_of_collapsed_stacks():
    raw = ("main (a/x.py:1);step (engines/llm/engine.py:10);forward (llm/model.py:5) 30\n"
           "main (a/x.py:1);step (engines/llm/engine.py:10) 10\n"
           "main (a/x.py:1);poll (zmq/socket.py:3) 60\n")
    s = summarise(raw)
    assert s["samples"] == 100
    assert s["self"][0] == ("poll (zmq/socket.py)", 0.6)
    assert ("step (llm/engine.py)", 0.4) in s["inclusive"]
    assert summarise("")["samples"] == 0


def test_merge_pools_samples_and_adds_durations():
    t = CountingTarget()
    a = asyncio.run(L.run_closed(t, 2, requests=6))
    b = asyncio.run(L.run_closed(t, 2, requests=4, first_index=100))
    m = L.Report.merge(t, [a, b])
    assert (m.requests, m.completed, m.concurrency) == (10, 10, 2)
    assert m.duration_s == pytest.approx(a.duration_s + b.duration_s)
    assert m.throughput_rps == pytest.approx(10 / m.duration_s)
    assert "samples" not in m.to_dict() and json.dumps(m.to_dict())


def test_sweep_goes_past_one_miss_and_stops_after_two():
    # A 100 ms stall on the 2nd rate only: one miss, then the sweep carries on.
    calls: list[int] = []

    class Stally(CountingTarget):
        async def call(self, i: int) -> L.Outcome:
            calls.append(i)
            if 100_000 <= i < 200_000 and i % 100_000 == 0:
                await asyncio.sleep(0.1)
            return await super().call(i)
    reps = asyncio.run(L.sweep_open(Stally(delay_s=0.001), [50, 60, 70], duration_s=0.3,
                                    p99_bound_ms=50.0, warmup=0))
    assert len(reps) == 3 and reps[1].latency_ms["p99"] > 50 >= reps[2].latency_ms["p99"]
    slow = asyncio.run(L.sweep_open(CountingTarget(delay_s=0.06), [50, 60, 70, 80],
                                    duration_s=0.2, p99_bound_ms=50.0, warmup=0))
    assert len(slow) == 2
