"""Triton-shaped statistics: what an engine records and how the frontend sums engines."""
from __future__ import annotations

from engines.inference_stats import InferenceStats
from frontends.http.kserve_stats import empty_model_stat, merge_model_stats


def test_batch_counts_once_per_execution_and_once_per_request():
    s = InferenceStats()
    phases = (0.001, 0.002, 0.003)
    s.executed(3, phases)                 # one batch: a request of 2 rows and one of 1
    s.succeeded(2, 0.010, 0.004, phases)
    s.succeeded(1, 0.008, 0.002, phases)
    s.failed(0.5)
    w = s.to_wire()
    assert (w["inference_count"], w["execution_count"]) == (3, 1)
    st = w["inference_stats"]
    assert st["success"] == {"count": 2, "ns": 18_000_000}
    assert st["queue"] == {"count": 2, "ns": 6_000_000}
    assert st["compute_infer"] == {"count": 2, "ns": 4_000_000}
    assert st["fail"] == {"count": 1, "ns": 500_000_000}
    assert st["cache_hit"] == st["cache_miss"] == {"count": 0, "ns": 0}
    assert w["batch_stats"] == [{"batch_size": 3, "compute_input": {"count": 1, "ns": 1_000_000},
                                 "compute_infer": {"count": 1, "ns": 2_000_000},
                                 "compute_output": {"count": 1, "ns": 3_000_000}}]
    assert w["last_inference"] > 0


def test_merge_sums_engines_and_keeps_the_latest_inference():
    a, b = InferenceStats(), InferenceStats()
    for s, size in ((a, 1), (b, 1), (b, 4)):
        s.executed(size, (0.0, 0.001, 0.0))
        s.succeeded(size, 0.002, 0.0, (0.0, 0.001, 0.0))
    merged = merge_model_stats([a.to_wire(), b.to_wire()])
    assert merged["inference_count"] == 6 and merged["execution_count"] == 3
    assert merged["inference_stats"]["success"]["count"] == 3
    assert [(x["batch_size"], x["compute_infer"]["count"]) for x in merged["batch_stats"]] \
        == [(1, 2), (4, 1)]
    assert merged["last_inference"] == max(a.last_inference_ms, b.last_inference_ms)
    assert merge_model_stats([]) == empty_model_stat()
