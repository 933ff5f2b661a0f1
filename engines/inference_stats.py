"""Per-model-version inference statistics in the shape of Triton's statistics extension.

A tensor engine records every request's fate and every batch it runs; `to_wire()` is the part
of a `$model_stat` an engine knows (all but name and version), in plain msgpack-able types, so
the frontend only sums what several engines report and adds the names. Durations are
nanoseconds, as Triton reports them. As in Triton, the compute durations of a batch count once
per execution in `batch_stats` and once per successful request in `inference_stats` (each
request of a batch is charged its batch's compute time).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Duration", "InferenceStats", "PHASES", "DURATIONS"]

PHASES = ("compute_input", "compute_infer", "compute_output")
DURATIONS = ("success", "fail", "queue", *PHASES, "cache_hit", "cache_miss")


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(0, int(seconds * 1e9))

    def to_wire(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


def _durations(names: tuple[str, ...]) -> dict[str, Duration]:
    return {name: Duration() for name in names}


@dataclass(slots=True)
class InferenceStats:
    inference_count: int = 0          # rows of successful requests (a batch of 64 counts 64)
    execution_count: int = 0          # model executions (one per batch run)
    last_inference_ms: int = 0        # wall clock, ms since the epoch
    totals: dict[str, Duration] = field(default_factory=lambda: _durations(DURATIONS))
    batches: dict[int, dict[str, Duration]] = field(default_factory=dict)

    def executed(self, batch_size: int, phases: tuple[float, float, float]) -> None:
        """One model execution of `batch_size` rows; `phases` are its input/infer/output s."""
        self.execution_count += 1
        per_size = self.batches.setdefault(batch_size, _durations(PHASES))
        for name, seconds in zip(PHASES, phases):
            per_size[name].add(seconds)

    def succeeded(self, rows: int, total_s: float, queue_s: float,
                  phases: tuple[float, float, float]) -> None:
        self.inference_count += rows
        self.last_inference_ms = int(time.time() * 1000)
        self.totals["success"].add(total_s)
        self.totals["queue"].add(queue_s)
        for name, seconds in zip(PHASES, phases):
            self.totals[name].add(seconds)

    def failed(self, total_s: float) -> None:
        self.last_inference_ms = int(time.time() * 1000)
        self.totals["fail"].add(total_s)

    def to_wire(self) -> dict[str, Any]:
        return {
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {name: d.to_wire() for name, d in self.totals.items()},
            "batch_stats": [{"batch_size": size, **{n: d.to_wire() for n, d in per.items()}}
                            for size, per in sorted(self.batches.items())],
        }
