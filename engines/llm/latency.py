"""Per-request latency histograms recorded in the engine, at the events that define them.

The engine sees every token of every request of its models whichever frontend sent them, so
these histograms are exact however many HTTP workers there are: the scraping worker reads them
with the engine's stats and renders them as Prometheus histograms (vLLM's `time_to_first_token`,
`inter_token_latency` and `e2e_request_latency`, frontends/http/vllm_compat.py). Times run from
the engine receiving the request; the buckets are vLLM's, so dashboards built for it read them.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Histogram", "RequestLatency", "TTFT_BUCKETS", "ITL_BUCKETS", "E2E_BUCKETS"]

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass(slots=True)
class Histogram:
    """Prometheus semantics: a value lands in the first bucket whose upper bound is >= it."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)     # per bucket, +Inf last; not cumulative
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def to_wire(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.total}


@dataclass(slots=True)
class RequestLatency:
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))

    def to_wire(self) -> dict[str, Any]:
        return {"ttft": self.ttft.to_wire(), "itl": self.itl.to_wire(),
                "e2e": self.e2e.to_wire()}
