"""The load generator: drives one target (benchmarks/targets.py) and reports what it measured.

Two ways to offer load:

- closed loop (`run_closed`): `concurrency` workers, each sending its next request when the last
  one finished, until exactly `requests` have been sent (or `duration_s` passed). Measures
  capacity; latency is what a fixed pool of clients sees.
- open loop (`run_open`): requests arrive as a Poisson process at `rate` per second, whether or
  not earlier ones finished. Latency is counted from the *scheduled* arrival, so a server (or a
  generator) that falls behind pays for it: no coordinated omission.

A report gives throughput, latency percentiles and error counts; for streams also time to first
token (TTFT), inter-token latency (ITL: every gap between consecutive token arrivals), time per
output token (TPOT: per request, (last − first token) / (tokens − 1)) and output tokens/s.
`Report.check()` raises `LoadError` when any request failed: a benchmark that silently averages
over errors is worse than none.

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --target kserve-json \
        --model digits --concurrency 4 --requests 200
    python -m benchmarks.loadgen --url ... --target chat-sse --model smollm2 --rate 2 --duration 20
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

__all__ = ["Outcome", "Sample", "Target", "Report", "LoadError", "run_closed", "run_open",
           "sweep_open", "percentiles", "main"]

log = logging.getLogger(__name__)

_PCTS = (50, 90, 99)


class LoadError(RuntimeError):
    """A run in which requests failed (or none completed)."""


@dataclass(slots=True)
class Outcome:
    """What a target returns for one successful request."""

    tokens: int = 0                                            # output tokens (streams)
    token_times: list[float] = field(default_factory=list)     # perf_counter of each token arrival


@dataclass(slots=True)
class Sample:
    start: float          # perf_counter: scheduled arrival (open loop) or send time (closed loop)
    end: float
    error: str = ""
    tokens: int = 0
    token_times: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error


class Target(Protocol):
    """One way to send a request to one system. `call(i)` sends request number i and returns
    when its response is complete; it raises on any failure (a non-2xx status, an error event
    in a stream, a malformed body)."""

    name: str
    streaming: bool

    async def open(self) -> None: ...

    async def call(self, i: int) -> Outcome: ...

    async def close(self) -> None: ...


def percentiles(values: Sequence[float], scale: float = 1e3) -> dict[str, float] | None:
    """p50/p90/p99/max/mean of `values` (seconds) in milliseconds; None when empty."""
    if not len(values):
        return None
    arr = np.asarray(values, dtype=np.float64) * scale
    out = {f"p{q}": float(np.percentile(arr, q)) for q in _PCTS}
    out.update(max=float(arr.max()), mean=float(arr.mean()))
    return out


@dataclass(slots=True)
class Report:
    target: str
    mode: str                          # "closed" | "open"
    concurrency: int | None
    rate: float | None                 # offered requests/s (open loop)
    requests: int                      # sent
    completed: int
    errors: int
    duration_s: float                  # first send → last completion
    throughput_rps: float              # completed / duration
    latency_ms: dict[str, float] | None
    error_examples: list[str] = field(default_factory=list)
    output_tokens: int = 0
    tokens_per_s: float = 0.0          # output tokens of completed requests / duration
    ttft_ms: dict[str, float] | None = None
    itl_ms: dict[str, float] | None = None
    tpot_ms: dict[str, float] | None = None
    samples: list[Sample] = field(default_factory=list, repr=False)   # not in to_dict()

    @classmethod
    def build(cls, target: Target, mode: str, samples: list[Sample], *,
              concurrency: int | None = None, rate: float | None = None,
              duration_s: float | None = None) -> Report:
        good = [s for s in samples if s.ok]
        bad = [s for s in samples if not s.ok]
        if duration_s is None:
            duration_s = (max(s.end for s in samples) - min(s.start for s in samples)
                          if samples else 0.0)
        duration = max(duration_s, 1e-9)
        out_tokens = sum(s.tokens for s in good)
        rep = cls(target.name, mode, concurrency, rate, len(samples), len(good), len(bad),
                  duration, len(good) / duration, percentiles([s.end - s.start for s in good]),
                  sorted({s.error for s in bad})[:5], out_tokens, out_tokens / duration,
                  samples=samples)
        if target.streaming:
            timed = [s for s in good if s.token_times]
            rep.ttft_ms = percentiles([s.token_times[0] - s.start for s in timed])
            rep.itl_ms = percentiles([b - a for s in timed
                                      for a, b in zip(s.token_times, s.token_times[1:])])
            rep.tpot_ms = percentiles([(s.token_times[-1] - s.token_times[0]) / (s.tokens - 1)
                                       for s in timed if s.tokens > 1])
        return rep

    def check(self) -> Report:
        """Raise LoadError if any request failed or none completed; else return self."""
        if self.errors or not self.completed:
            raise LoadError(f"{self.target} ({self.mode}): {self.errors} of {self.requests} "
                            f"requests failed; e.g. {self.error_examples}")
        return self

    @classmethod
    def merge(cls, target: Target, reports: Sequence[Report]) -> Report:
        """Several runs of one load as one report: samples pooled, durations added (the runs
        were separate in time, so throughput is total completions over total busy time)."""
        first = reports[0]
        return cls.build(target, first.mode, [s for r in reports for s in r.samples],
                         concurrency=first.concurrency, rate=first.rate,
                         duration_s=sum(r.duration_s for r in reports))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["samples"]
        return out

    def line(self) -> str:
        lat = self.latency_ms or {}
        load = f"c={self.concurrency}" if self.mode == "closed" else f"rate={self.rate:g}/s"
        text = (f"{self.target:<22} {load:<12} n={self.completed}/{self.requests} "
                f"err={self.errors} {self.throughput_rps:8.1f} req/s  "
                f"p50={lat.get('p50', math.nan):7.1f} p99={lat.get('p99', math.nan):7.1f} ms")
        if self.ttft_ms:
            text += (f"  ttft p50={self.ttft_ms['p50']:.0f} p99={self.ttft_ms['p99']:.0f} ms"
                     f"  {self.tokens_per_s:.1f} tok/s")
        return text


async def _timed(target: Target, i: int, start: float, timeout_s: float) -> Sample:
    try:
        out = await asyncio.wait_for(target.call(i), timeout_s)
    except asyncio.TimeoutError:
        return Sample(start, time.perf_counter(), error=f"timeout after {timeout_s:g} s")
    except Exception as exc:   # any failure of the system under test is a counted error
        return Sample(start, time.perf_counter(), error=f"{type(exc).__name__}: {exc}"[:300])
    return Sample(start, time.perf_counter(), tokens=out.tokens, token_times=out.token_times)


async def _warm(target: Target, warmup: int, timeout_s: float) -> None:
    for i in range(warmup):
        s = await _timed(target, -1 - i, time.perf_counter(), timeout_s)
        if not s.ok:
            raise LoadError(f"{target.name}: warm-up request failed: {s.error}")


async def run_closed(target: Target, concurrency: int, *, requests: int | None = None,
                     duration_s: float | None = None, warmup: int = 0,
                     timeout_s: float = 60.0, first_index: int = 0) -> Report:
    """`concurrency` workers send back-to-back until `requests` were sent or `duration_s`
    passed (whichever is given; both: whichever comes first)."""
    if concurrency < 1 or (requests is None and duration_s is None):
        raise ValueError("run_closed needs concurrency >= 1 and requests or duration_s")
    await _warm(target, warmup, timeout_s)
    samples: list[Sample] = []
    sent = 0
    t0 = time.perf_counter()
    stop_at = t0 + duration_s if duration_s is not None else math.inf

    async def worker() -> None:
        nonlocal sent
        while (requests is None or sent < requests) and time.perf_counter() < stop_at:
            i = first_index + sent
            sent += 1
            samples.append(await _timed(target, i, time.perf_counter(), timeout_s))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Report.build(target, "closed", samples, concurrency=concurrency)


def poisson_arrivals(rate: float, *, requests: int | None = None,
                     duration_s: float | None = None, seed: int = 0) -> list[float]:
    """Arrival offsets (seconds from the start) of a Poisson process at `rate` per second."""
    if rate <= 0 or (requests is None and duration_s is None):
        raise ValueError("poisson_arrivals needs rate > 0 and requests or duration_s")
    rng = np.random.default_rng(seed)
    n = requests if requests is not None else int(rate * duration_s * 1.5) + 16
    times = np.cumsum(rng.exponential(1.0 / rate, size=n))
    if duration_s is not None:
        times = times[times < duration_s]
    return times.tolist()


async def run_open(target: Target, rate: float, *, requests: int | None = None,
                   duration_s: float | None = None, warmup: int = 0, timeout_s: float = 60.0,
                   seed: int = 0, first_index: int = 0) -> Report:
    """Poisson arrivals at `rate`/s; each request's latency counts from its scheduled time."""
    arrivals = poisson_arrivals(rate, requests=requests, duration_s=duration_s, seed=seed)
    await _warm(target, warmup, timeout_s)
    t0 = time.perf_counter()
    tasks = []
    for i, offset in enumerate(arrivals):
        due = t0 + offset
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_timed(target, first_index + i, due, timeout_s)))
    samples = list(await asyncio.gather(*tasks))
    return Report.build(target, "open", samples, rate=rate)


async def sweep_open(target: Target, rates: Sequence[float], *, duration_s: float,
                     p99_bound_ms: float, timeout_s: float = 30.0, warmup: int = 5,
                     seed: int = 0, patience: int = 2) -> list[Report]:
    """Open-loop runs at increasing `rates` until `patience` rates in a row miss the bound
    (p99 above it, or failed requests). One miss does not end the sweep: on a shared machine
    a single stall can lift one run's p99. Failing runs stay in the list, so a plot shows
    where the knee is."""
    reports = []
    misses = 0
    for k, rate in enumerate(sorted(rates)):
        rep = await run_open(target, rate, duration_s=duration_s, warmup=warmup if k == 0 else 0,
                             timeout_s=timeout_s, seed=seed + k, first_index=k * 100_000)
        log.info("%s", rep.line())
        reports.append(rep)
        p99 = (rep.latency_ms or {}).get("p99", math.inf)
        misses = misses + 1 if rep.errors or p99 > p99_bound_ms else 0
        if misses >= patience:
            break
    return reports


def best_under_bound(reports: Sequence[Report], p99_bound_ms: float) -> Report | None:
    """The run with the highest achieved throughput whose p99 met the bound with no errors."""
    ok = [r for r in reports if not r.errors and r.latency_ms
          and r.latency_ms["p99"] <= p99_bound_ms]
    return max(ok, key=lambda r: r.throughput_rps, default=None)


# -- command line -------------------------------------------------------------------------

def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True,
                    choices=["kserve-json", "kserve-binary", "zmq", "zmq-shm", "chat-sse", "ws"])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="Ferry's HTTP base URL")
    ap.add_argument("--zmq", default="", help="Ferry's ZMQ endpoint (zmq targets)")
    ap.add_argument("--model", required=True)
    load = ap.add_mutually_exclusive_group(required=True)
    load.add_argument("--concurrency", type=int, help="closed loop with this many workers")
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    ap.add_argument("--requests", type=int)
    ap.add_argument("--duration", type=float)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32, help="stream targets")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--out", type=Path, help="write the report as JSON here")
    args = ap.parse_args(argv)
    if args.requests is None and args.duration is None:
        ap.error("give --requests or --duration")
    return args


async def _cli(args: argparse.Namespace) -> Report:
    from benchmarks import targets as T
    target = await T.for_cli(args.target, url=args.url, zmq_endpoint=args.zmq, model=args.model,
                             max_tokens=args.max_tokens)
    await target.open()
    try:
        if args.concurrency is not None:
            return await run_closed(target, args.concurrency, requests=args.requests,
                                    duration_s=args.duration, warmup=args.warmup,
                                    timeout_s=args.timeout)
        return await run_open(target, args.rate, requests=args.requests,
                              duration_s=args.duration, warmup=args.warmup,
                              timeout_s=args.timeout)
    finally:
        await target.close()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    report = asyncio.run(_cli(args))
    print(report.line())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report.to_dict(), indent=2))
    try:
        report.check()
    except LoadError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
