"""Ferry's load under the names the LLM routers of the field read (vLLM's).

Routers (vLLM production-stack's router, llm-d / the Gateway API Inference Extension's endpoint
picker, sglang-router) balance by a server's own load signals, and they speak vLLM's: the
Prometheus families of vllm/v1/metrics/loggers.py, with its names, types, buckets and label set
(`model_name`, `engine`), and the ORCA `endpoint-load-metrics` response header. This module
derives both from the LLM engines' stats at the moment they are asked for, so every value is
the engine's own state (scheduler queues, block pool, the latency histograms it records at the
token events, engines/llm/latency.py), whichever HTTP worker answers.

A Ferry model name may have several versions on one engine; vLLM's labels know no version, so
their samples are summed per (model name, engine), and KV usage is the share of those versions'
blocks held by sequences (vLLM's "1 - free/total", cached-but-free blocks counting as free).

`GET /get_load` is the load report vllm-router's and sglang-router's `power_of_two` policy polls
(it reads the integer `load`): the generations running plus waiting on this host's LLM engines,
with the parts it is made of.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)

__all__ = ["vllm_families", "LlmLoad", "llm_loads", "orca_header", "ORCA_REQUEST_HEADER",
           "ORCA_RESPONSE_HEADER", "load_report", "setup"]

ORCA_REQUEST_HEADER = "endpoint-load-metrics-format"
ORCA_RESPONSE_HEADER = "endpoint-load-metrics"
_LABELS = ["model_name", "engine"]

# (LlmLoad counter attribute, vLLM name without `_total`, help)
_COUNTERS = (
    ("prompt_tokens", "vllm:prompt_tokens", "Number of prefill tokens processed."),
    ("generation_tokens", "vllm:generation_tokens", "Number of generation tokens processed."),
    ("prefix_queries", "vllm:prefix_cache_queries",
     "Prefix cache queries, in terms of number of queried tokens."),
    ("prefix_hits", "vllm:prefix_cache_hits",
     "Prefix cache hits, in terms of number of cached tokens."),
    ("preemptions", "vllm:num_preemptions", "Cumulative number of preemption from the engine."),
    # vLLM's names before 0.9, still read by routers and dashboards built then
    ("prefix_queries", "vllm:gpu_prefix_cache_queries", "GPU prefix cache queries, in terms of "
     "number of queried tokens. DEPRECATED: Use vllm:prefix_cache_queries instead."),
    ("prefix_hits", "vllm:gpu_prefix_cache_hits", "GPU prefix cache hits, in terms of number "
     "of cached tokens. DEPRECATED: Use vllm:prefix_cache_hits instead."),
)
# (latency key, vLLM name, help)
_HISTOGRAMS = (
    ("ttft", "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds."),
    ("itl", "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds."),
    ("e2e", "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds."),
)


@dataclass(slots=True)
class LlmLoad:
    """One model name on one engine: its LLM versions' stats, summed."""

    model: str
    engine: str
    running: int = 0
    waiting: int = 0
    blocks_total: int = 0
    blocks_used: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    cache_configs: set[tuple[int, int]] = field(default_factory=set)   # (block_size, blocks)
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def kv_usage(self) -> float:
        return self.blocks_used / self.blocks_total if self.blocks_total else 0.0

    def add(self, s: dict[str, Any]) -> None:
        self.running += int(s.get("running", 0))
        self.waiting += int(s.get("waiting", 0))
        self.blocks_total += int(s.get("kv_blocks_total", 0))
        self.blocks_used += int(s.get("kv_blocks_used", 0))
        self.prompt_tokens += int(s.get("prompt_tokens", 0))
        self.generation_tokens += int(s.get("tokens_generated", 0))
        self.prefix_queries += int(s.get("prefix_cache_query_tokens", 0))
        self.prefix_hits += int(s.get("prefix_cache_hit_tokens", 0))
        self.preemptions += int(s.get("preemptions", 0))
        self.cache_configs.add((int(s.get("block_size", 0)), int(s.get("kv_blocks_total", 0))))
        for key, h in (s.get("latency") or {}).items():
            mine = self.latency.get(key)
            if mine is None or mine["bounds"] != h["bounds"]:
                self.latency[key] = {"bounds": list(h["bounds"]), "counts": list(h["counts"]),
                                     "sum": float(h["sum"])}
                continue
            mine["counts"] = [a + b for a, b in zip(mine["counts"], h["counts"])]
            mine["sum"] += float(h["sum"])


def llm_loads(stats: dict[str, dict[str, Any]], model: str | None = None) -> list[LlmLoad]:
    """Per (model name, engine), from the engines' stats (by engine id); only LLM versions
    (those with a KV cache), only `model` when given."""
    loads: dict[tuple[str, str], LlmLoad] = {}
    for eid, s in sorted(stats.items()):
        for key, ms in sorted(s.get("models", {}).items()):
            name = key.rpartition(":")[0]
            if "kv_blocks_total" not in ms or (model is not None and name != model):
                continue
            loads.setdefault((name, eid), LlmLoad(name, eid)).add(ms)
    return list(loads.values())


def vllm_families(stats: dict[str, dict[str, Any]]) -> list[Metric]:
    loads = llm_loads(stats)
    if not loads:
        return []
    running = GaugeMetricFamily("vllm:num_requests_running",
                                "Number of requests in model execution batches.", labels=_LABELS)
    waiting = GaugeMetricFamily("vllm:num_requests_waiting",
                                "Number of requests waiting to be processed.", labels=_LABELS)
    kv = GaugeMetricFamily("vllm:kv_cache_usage_perc",
                           "KV-cache usage. 1 means 100 percent usage.", labels=_LABELS)
    gpu_kv = GaugeMetricFamily("vllm:gpu_cache_usage_perc",
                               "GPU KV-cache usage. 1 means 100 percent usage. "
                               "DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
                               labels=_LABELS)
    info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine "
                             "CacheConfig", labels=["block_size", "num_gpu_blocks", *_LABELS])
    counters = [(attr, CounterMetricFamily(name, doc, labels=_LABELS))
                for attr, name, doc in _COUNTERS]
    histograms = {key: HistogramMetricFamily(name, doc, labels=_LABELS)
                  for key, name, doc in _HISTOGRAMS}
    for load in loads:
        values = [load.model, load.engine]
        running.add_metric(values, float(load.running))
        waiting.add_metric(values, float(load.waiting))
        kv.add_metric(values, load.kv_usage)
        gpu_kv.add_metric(values, load.kv_usage)
        for block_size, blocks in sorted(load.cache_configs):
            info.add_metric([str(block_size), str(blocks), *values], 1.0)
        for attr, fam in counters:
            fam.add_metric(values, float(getattr(load, attr)))
        for key, hist in histograms.items():
            h = load.latency.get(key)
            if h is not None:
                hist.add_metric(values, _cumulative(h), float(h["sum"]))
    return [running, waiting, kv, gpu_kv, info, *(fam for _, fam in counters),
            *histograms.values()]


def _cumulative(h: dict[str, Any]) -> list[tuple[str, float]]:
    out, acc = [], 0
    for bound, count in zip([*map(float, h["bounds"]), float("inf")], h["counts"]):
        acc += count
        out.append(("+Inf" if bound == float("inf") else repr(bound), float(acc)))
    return out


def orca_header(fmt: str, loads: list[LlmLoad]) -> str | None:
    """The `endpoint-load-metrics` value vLLM sends for `fmt` (TEXT or JSON; None for another):
    the KV usage and queue length of the host, over the model's engines."""
    total = sum(l.blocks_total for l in loads)
    named = {"kv_cache_usage_perc": sum(l.blocks_used for l in loads) / total if total else 0.0,
             "num_requests_waiting": float(sum(l.waiting for l in loads))}
    kind = fmt.strip().lower()
    if kind == "text":
        return "TEXT " + ", ".join(f"named_metrics.{k}={v}" for k, v in named.items())
    if kind == "json":
        return "JSON " + json.dumps({"named_metrics": named})
    return None


def load_report(loads: list[LlmLoad]) -> dict[str, Any]:
    """`/get_load`'s body: `load` (running + waiting generations, what power_of_two compares),
    its parts, the KV usage over every LLM engine, and the same per model name."""
    def part(ls: list[LlmLoad]) -> dict[str, Any]:
        running, waiting = sum(l.running for l in ls), sum(l.waiting for l in ls)
        total = sum(l.blocks_total for l in ls)
        return {"load": running + waiting, "num_requests_running": running,
                "num_requests_waiting": waiting,
                "kv_cache_usage_perc": sum(l.blocks_used for l in ls) / total if total else 0.0}
    names = sorted({l.model for l in loads})
    return {**part(loads), "models": {n: part([l for l in loads if l.model == n])
                                      for n in names}}


async def get_load(request: web.Request) -> web.Response:
    from frontends.http.appkeys import DISPATCHER
    from frontends.http.metrics import _engine_stats     # metrics imports this module
    return web.json_response(load_report(llm_loads(await _engine_stats(request.app[DISPATCHER]))))


def setup(app: web.Application) -> None:
    app.router.add_get("/get_load", get_load)
