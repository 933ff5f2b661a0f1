"""vLLM-named families and the ORCA header built from engine stats (frontends/http/vllm_compat)."""
from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engines.llm.latency import RequestLatency
from frontends.http.vllm_compat import llm_loads, orca_header, vllm_families


def _version(used: int, total: int, waiting: int, ttft: list[float]) -> dict:
    lat = RequestLatency()
    for t in ttft:
        lat.ttft.observe(t)
    return {"kv_blocks_total": total, "kv_blocks_used": used, "running": 1, "waiting": waiting,
            "prompt_tokens": 10, "tokens_generated": 4, "prefix_cache_query_tokens": 10,
            "prefix_cache_hit_tokens": 3, "block_size": 16, "latency": lat.to_wire()}


STATS = {"cpu": {"models": {"m:1": _version(2, 10, 1, [0.003]),
                            "m:2": _version(6, 30, 2, [0.003, 30.0]),
                            "digits:1": {"queued": 0}}}}


class _Fams:
    def __init__(self, fams: list) -> None:
        self.fams = fams

    def collect(self):
        return iter(self.fams)


def _parse() -> dict:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Fams(vllm_families(STATS)))
    text = generate_latest(reg).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_versions_of_one_name_sum_per_engine_and_tensor_models_are_left_out():
    (load,) = llm_loads(STATS)
    assert (load.model, load.engine, load.running, load.waiting) == ("m", "cpu", 2, 3)
    assert load.kv_usage == 8 / 40
    fams = _parse()
    (kv,) = fams["vllm:kv_cache_usage_perc"].samples
    assert kv.labels == {"model_name": "m", "engine": "cpu"} and kv.value == 0.2
    assert {s.labels["num_gpu_blocks"] for s in fams["vllm:cache_config_info"].samples} == {
        "10", "30"}
    hits = [s for s in fams["vllm:prefix_cache_hits"].samples if s.name.endswith("_total")]
    assert hits[0].value == 6


def test_histogram_buckets_are_cumulative_with_vllm_bounds():
    samples = _parse()["vllm:time_to_first_token_seconds"].samples
    bucket = {s.labels["le"]: s.value for s in samples if s.name.endswith("_bucket")}
    assert bucket["0.001"] == 0 and bucket["0.005"] == 2 and bucket["20.0"] == 2
    assert bucket["40.0"] == 3 and bucket["+Inf"] == 3
    count = [s.value for s in samples if s.name.endswith("_count")]
    assert count == [3]


def test_orca_header_text_and_json_as_vllm_writes_them():
    loads = llm_loads(STATS)
    assert orca_header("TEXT", loads) == ("TEXT named_metrics.kv_cache_usage_perc=0.2, "
                                          "named_metrics.num_requests_waiting=3.0")
    head = orca_header("json", loads)
    assert head is not None and head.startswith("JSON ")
    assert json.loads(head[5:]) == {"named_metrics": {"kv_cache_usage_perc": 0.2,
                                                      "num_requests_waiting": 3.0}}
    assert orca_header("BIN", loads) is None
    assert orca_header("TEXT", []) == ("TEXT named_metrics.kv_cache_usage_perc=0.0, "
                                       "named_metrics.num_requests_waiting=0.0")
