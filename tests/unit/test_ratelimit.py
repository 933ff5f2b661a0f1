"""Rate limiter: token buckets and concurrency caps shared by real processes."""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import pytest

from daemon.errors import FerryError
from daemon.state.ratelimit import Decision, RateLimiter, RateLimits

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def table(tmp_path):
    return tmp_path / "ratelimit.tbl"


def test_requests_per_minute_counts_down_then_refuses(table):
    clock = Clock()
    rl = RateLimiter(table, clock=clock)
    limits = RateLimits(rpm=5)
    seen = [rl.check("k", limits) for _ in range(5)]
    assert all(d.allowed for d in seen)
    assert [d.remaining for d in seen] == [4, 3, 2, 1, 0]
    assert seen[0].limit == 5 and seen[-1].reset_s == pytest.approx(60.0)
    refused = rl.check("k", limits)
    assert not refused.allowed and refused.reason == "requests" and refused.remaining == 0
    assert refused.retry_after_s == pytest.approx(12.0)  # one request refills in 60/5 s
    clock.t += 11.9
    assert not rl.check("k", limits).allowed
    clock.t += 0.2
    again = rl.check("k", limits)
    assert again.allowed and again.remaining == 0
    assert rl.check("other-key", limits).remaining == 4  # keys are independent


def test_headers(table):
    rl = RateLimiter(table, clock=Clock())
    limits = RateLimits(rpm=2, tpm=1000)
    ok = rl.check("k", limits, cost_tokens=100)
    assert ok.headers() == {"X-RateLimit-Limit": "2", "X-RateLimit-Remaining": "1",
                            "X-RateLimit-Reset": "30", "X-RateLimit-Limit-Tokens": "1000",
                            "X-RateLimit-Remaining-Tokens": "900"}
    rl.check("k", limits)
    no = rl.check("k", limits)
    assert no.headers()["Retry-After"] == "30" and no.headers()["X-RateLimit-Remaining"] == "0"
    unlimited = rl.check("k", RateLimits())
    assert unlimited.allowed and unlimited.headers() == {}


def test_tokens_per_minute(table):
    clock = Clock()
    rl = RateLimiter(table, clock=clock)
    limits = RateLimits(rpm=1000, tpm=100)
    first = rl.check("k", limits, cost_tokens=30)  # prompt estimate charged up front
    assert first.allowed and first.tokens_remaining == 70
    rl.charge_tokens("k", 90)                       # the completion: now 20 in debt
    refused = rl.check("k", limits)
    assert not refused.allowed and refused.reason == "tokens"
    assert refused.tokens_remaining == -20
    assert refused.retry_after_s == pytest.approx(21 * 60 / 100)  # back to >= 1 token
    assert refused.remaining == first.remaining  # a refused request costs no request
    clock.t += 12.7
    assert rl.check("k", limits).allowed
    rl.charge_tokens("k", -500)                     # refunds are capped at the limit
    assert rl.check("k", limits).tokens_remaining == 100


def test_limit_change_and_concurrency_only_slot_start_full(table):
    clock = Clock()
    rl = RateLimiter(table, clock=clock)
    assert rl.acquire_concurrency("k", 2).allowed     # creates the slot with no buckets
    d = rl.check("k", RateLimits(rpm=10, max_concurrent=2))
    assert d.allowed and d.remaining == 9
    d = rl.check("k", RateLimits(rpm=3))              # the key's limit was lowered
    assert d.allowed and d.remaining == 2


def test_concurrency_cap_and_release(table):
    rl = RateLimiter(table)
    assert [rl.acquire_concurrency("k", 2).allowed for _ in range(3)] == [True, True, False]
    refused = rl.acquire_concurrency("k", 2)
    assert refused.reason == "concurrency" and refused.retry_after_s > 0
    assert rl.in_flight("k") == 2
    rl.release("k")
    assert rl.acquire_concurrency("k", 2).allowed
    for _ in range(5):                                # extra releases are harmless
        rl.release("k")
    assert rl.in_flight("k") == 0
    assert rl.acquire_concurrency("k", None).allowed and rl.in_flight("k") == 0


def test_full_table_evicts_only_idle_slots(table, caplog):
    clock = Clock()
    rl = RateLimiter(table, slots=4, clock=clock)
    limits = RateLimits(rpm=2)
    for k in "abcd":
        assert rl.check(k, limits).allowed
    with caplog.at_level(logging.WARNING):
        assert rl.check("e", limits).allowed              # no slot: passes, with a warning
    assert "full" in caplog.text
    clock.t += 60                                          # a..d refill: idle, reusable
    assert [rl.check("e", limits).allowed for _ in range(3)] == [True, True, False]
    assert rl.check("a", limits).remaining == 1            # evicted or not, a is full again


def test_table_layout_is_adopted_or_refused(table):
    RateLimiter(table, slots=8).close()
    other = RateLimiter(table, slots=1024)                 # adopts the existing 8-slot table
    assert other._slots == 8
    other.close()
    table.write_bytes(b"garbage" * 100)
    with pytest.raises(FerryError) as err:
        RateLimiter(table)
    assert err.value.code == "ratelimit_table_invalid"
    assert oct(os.stat(table).st_mode & 0o777) == "0o600"


def test_cost_per_check_is_far_below_a_millisecond(table):
    rl = RateLimiter(table)
    limits = RateLimits(rpm=10**9, tpm=10**12, max_concurrent=10**6)
    samples = []
    for i in range(3000):
        key = f"key-{i % 50}"
        t0 = time.perf_counter()
        rl.check(key, limits, cost_tokens=10)
        samples.append(time.perf_counter() - t0)
    samples.sort()
    median, p99 = statistics.median(samples), samples[int(len(samples) * 0.99)]
    print(f"rate-limit check: median {median * 1e6:.1f} us, p99 {p99 * 1e6:.1f} us")
    assert median < 200e-6 and statistics.fmean(samples) < 1e-3


# -- across processes -------------------------------------------------------------------------
LIMIT = 30_000  # large enough that draining it takes the processes ~100 ms side by side


def _hammer(path: str, frozen_now: float, start, out) -> None:
    # A frozen clock: no refill during the race, so the exact total is knowable.
    rl = RateLimiter(Path(path), clock=lambda: frozen_now)
    limits = RateLimits(rpm=LIMIT)
    start.wait(30)
    allowed = refused_in_a_row = 0
    while refused_in_a_row < 200:        # until the shared budget is clearly gone
        if rl.check("shared", limits).allowed:
            allowed += 1
            refused_in_a_row = 0
        else:
            refused_in_a_row += 1
    out.put((os.getpid(), allowed))


def test_processes_share_one_budget(table):
    ctx = mp.get_context("spawn")
    procs_n = 3
    start, out = ctx.Barrier(procs_n), ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(str(table), 5000.0, start, out))
             for _ in range(procs_n)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=40) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
    assert len({pid for pid, _ in results}) == procs_n
    assert sum(n for _, n in results) == LIMIT
    rl = RateLimiter(table, clock=lambda: 5000.0)
    last = rl.check("shared", RateLimits(rpm=LIMIT))
    assert not last.allowed and last.remaining == 0 and last.retry_after_s > 0


def _drain(rl: RateLimiter, start, out) -> None:
    limits = RateLimits(rpm=LIMIT)
    start.wait(30)
    allowed = refused_in_a_row = 0
    while refused_in_a_row < 200:
        if rl.check("shared", limits).allowed:
            allowed += 1
            refused_in_a_row = 0
        else:
            refused_in_a_row += 1
    out.put(allowed)


def test_a_forked_child_does_not_share_the_parents_lock(table):
    """flock is per open file description, which fork shares: the child must reopen."""
    ctx = mp.get_context("fork")
    rl = RateLimiter(table, clock=lambda: 5000.0)
    rl.check("warm-up", RateLimits(rpm=1))
    start, out = ctx.Barrier(2), ctx.Queue()
    child = ctx.Process(target=_drain, args=(rl, start, out))
    child.start()
    try:
        _drain(rl, start, out)
        assert out.get(timeout=40) + out.get(timeout=40) == LIMIT
    finally:
        child.join(10)


def _hold(path: str, n: int, held, conn) -> None:
    rl = RateLimiter(Path(path))
    for _ in range(n):
        rl.acquire_concurrency("shared", 3)
    held.set()
    conn.poll(30)  # until the parent kills us (a killed waiter would wedge an Event)


def test_concurrency_cap_spans_processes_and_survives_a_crash(table):
    ctx = mp.get_context("spawn")
    held = ctx.Event()
    parent_end, child_end = ctx.Pipe()
    child = ctx.Process(target=_hold, args=(str(table), 2, held, child_end))
    child.start()
    try:
        assert held.wait(30)
        rl = RateLimiter(table)
        assert rl.in_flight("shared") == 2
        d = rl.acquire_concurrency("shared", 3)
        assert d.allowed and d.remaining == 0
        assert not rl.acquire_concurrency("shared", 3).allowed
        child.kill()                                      # dies without releasing
        child.join(10)
        assert rl.acquire_concurrency("shared", 3).allowed  # dead holder's slots reclaimed
        assert rl.in_flight("shared") == 2                # ours only
    finally:
        if child.is_alive():
            child.kill()
        child.join(10)


def test_decision_is_plain_data():
    d = Decision(True, 10, 9, 6.0, 0.0)
    assert d.allowed and d.reason is None and d.tokens_limit is None
