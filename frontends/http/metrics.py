"""`GET /metrics`: Prometheus text format for the whole daemon, and the per-request HTTP metrics.

Whichever HTTP worker a scrape lands on answers for every process: the request counters and
histograms of all frontends come from prometheus_client's multiprocess files (daemon/metrics.py),
and the engine-side numbers (KV cache, prefix cache, arenas, queues, restarts) are read at scrape
time from the engines' stats and the supervisor's placement, so they are exact and cost nothing
per request. The same engine stats feed vLLM's metric names and the ORCA load-report header
that LLM routers read (frontends/http/vllm_compat.py). GPU gauges come from NVML when the `pynvml` module and a driver are present; without
them the GPU families are simply absent. Client-defined series (POST /metrics/custom) are read
from the state database at scrape time (frontends/http/custom_metrics.py).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Awaitable, Callable, Iterable

from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.multiprocess import MultiProcessCollector

from daemon import metrics
from daemon import protocol as P
from daemon.errors import FerryError
from frontends.dispatch import Dispatcher
from frontends.http.appkeys import DISPATCHER
from frontends.http.custom_metrics import custom_families
from frontends.http.vllm_compat import (ORCA_REQUEST_HEADER, ORCA_RESPONSE_HEADER, llm_loads,
                                        orca_header, vllm_families)
from frontends.http.vllm_compat import _cumulative as cumulative_buckets

__all__ = ["setup", "metrics_middleware", "engine_families", "gpu_families"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A hung engine must not hang the scrape: it shows as ferry_engine_up 0 instead.
STATS_TIMEOUT_S = 1.0

# (stats key, metric name, help) of an engine's own counters and of its shared-memory arena.
_ENGINE_COUNTERS = (("requests", "ferry_engine_requests", "Requests an engine accepted."),
                    ("errors", "ferry_engine_errors", "Requests an engine refused."))
_ARENA_GAUGES = (("size", "ferry_shm_arena_size_bytes", "Size of an engine's output arena."),
                 ("used", "ferry_shm_arena_used_bytes", "Bytes of the arena in use."),
                 ("high_water", "ferry_shm_arena_high_water_bytes",
                  "Most arena bytes ever in use at once."),
                 ("blocks", "ferry_shm_arena_blocks", "Blocks of the arena in use."))
# Per model version; a key an engine kind does not report is skipped.
_MODEL_GAUGES = (
    ("queued", "ferry_model_queued_requests", "Tensor requests waiting in the batcher."),
    ("kv_blocks_total", "ferry_kv_cache_blocks_total", "KV-cache blocks of an LLM."),
    ("kv_blocks_used", "ferry_kv_cache_blocks_used", "KV-cache blocks held by sequences."),
    ("kv_blocks_cached", "ferry_kv_cache_blocks_cached",
     "Free KV-cache blocks kept for prefix reuse."),
    ("prefix_cache_hit_rate", "ferry_prefix_cache_hit_ratio",
     "Share of prompt tokens served from the prefix cache."),
    ("running", "ferry_llm_running_sequences", "Sequences in the running batch."),
    ("waiting", "ferry_llm_waiting_sequences", "Sequences waiting to be scheduled."))
_MODEL_COUNTERS = (
    ("prefix_cache_query_tokens", "ferry_prefix_cache_query_tokens",
     "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hit_tokens", "ferry_prefix_cache_hit_tokens",
     "Prompt tokens found in the prefix cache."),
    ("preemptions", "ferry_llm_preemptions", "Sequences preempted for lack of KV blocks."))

# Diffusion models (stats with "diffusion_latency"): counters, gauges and the engine's own
# step / image histograms, per engine, model and version.
_DIFFUSION_COUNTERS = (
    ("images", "ferry_diffusion_images", "Images a diffusion model generated (PNG encoded)."),
    ("steps", "ferry_diffusion_steps", "Denoising steps (one forward of a batch of images)."),
    ("row_steps", "ferry_diffusion_image_steps", "Denoising steps summed over the images "
     "each step advanced."))
_DIFFUSION_OUTCOMES = ("completed", "cancelled", "expired", "failed")
_DIFFUSION_GAUGES = (
    ("active_rows", "ferry_diffusion_active_images", "Images in a running denoising batch."),
    ("waiting_rows", "ferry_diffusion_waiting_images", "Images waiting for a batch slot."))
_DIFFUSION_HISTOGRAMS = (
    ("step", "ferry_diffusion_step_seconds", "Time of one denoising step (a forward of the "
     "batch's images and their scheduler steps)."),
    ("image", "ferry_diffusion_image_seconds", "Time from the engine receiving a request to "
     "one of its images being encoded."))

# Routes whose responses carry an ORCA load report when the request asks for one (vLLM's).
_ORCA_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_MODEL_SLOT = "ferry.metrics.model"    # request key: the model label slot of track_model()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def setup(app: web.Application) -> None:
    # Outermost, so requests refused by any other middleware (auth, errors) are counted too.
    app.middlewares.insert(0, metrics_middleware)
    app.router.add_get("/metrics", metrics_view)
    # A signal rather than the middleware: an SSE response sends its headers long before its
    # handler returns, and this runs just before they go out, for every kind of response.
    app.on_response_prepare.append(_orca_on_prepare)


# -- per-request metrics ---------------------------------------------------------------------------

def _route(request: web.Request) -> str:
    """The route template ("/v2/models/{model}/infer"): bounded label values, unlike paths."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    slot, token = metrics.track_model()
    request[_MODEL_SLOT] = slot
    start = time.perf_counter()
    status = 500
    metrics.IN_FLIGHT.inc()
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499   # the client went away (nginx's code for it)
        raise
    finally:
        metrics.IN_FLIGHT.dec()
        token.var.reset(token)
        metrics.observe_request(_route(request), slot[0], status, time.perf_counter() - start)


async def _orca_on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """`endpoint-load-metrics` (ORCA) on a completion when the request carries
    `endpoint-load-metrics-format: TEXT|JSON`: the KV usage and queue length of the engines
    serving the model the request named (all LLMs when it named none), read from them now."""
    fmt = request.headers.get(ORCA_REQUEST_HEADER)
    if not fmt or request.path not in _ORCA_PATHS:
        return
    slot = request.get(_MODEL_SLOT)
    model = slot[0] if slot and slot[0] else None
    stats = await _engine_stats(request.app[DISPATCHER])
    loads = llm_loads(stats, model) if model is not None else []
    value = orca_header(fmt, loads or llm_loads(stats))
    if value is not None:
        response.headers[ORCA_RESPONSE_HEADER] = value


# -- the scrape ----------------------------------------------------------------------------------

async def metrics_view(request: web.Request) -> web.Response:
    d = request.app[DISPATCHER]
    stats = await _engine_stats(d)
    families = [*engine_families(d.placement, stats), *vllm_families(stats), *gpu_families(),
                *await custom_families(request.app)]
    # Reading every process's files is disk work: keep it off the event loop.
    body = await asyncio.get_running_loop().run_in_executor(None, _render, families)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _engine_stats(d: Dispatcher) -> dict[str, dict[str, Any]]:
    """Stats of every engine that answers in time, by engine id."""
    engines = d.placement.engines if d.placement is not None else {}

    async def one(eid: str) -> dict[str, Any] | None:
        try:
            reply = await d.call_engine(eid, P.StatsQuery(uuid.uuid4().hex),
                                        timeout_s=STATS_TIMEOUT_S)
        except (FerryError, asyncio.TimeoutError):
            return None
        return reply.stats  # type: ignore[attr-defined]
    alive = [eid for eid, e in engines.items() if e.get("alive")]
    answers = await asyncio.gather(*(one(eid) for eid in alive))
    return {eid: s for eid, s in zip(alive, answers) if s is not None}


class _Families:
    """A collector over metric families that were built already."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return iter(self.families)


def _render(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    path = metrics.multiproc_dir()
    if path is not None:
        MultiProcessCollector(registry, path)
    else:   # run outside `ferry serve` (an app in a test): this process's own metrics
        registry.register(_Families(REGISTRY.collect()))
    registry.register(_Families(families))
    return generate_latest(registry)


def engine_families(placement: P.Placement | None,
                    stats: dict[str, dict[str, Any]]) -> list[Metric]:
    """Gauges and counters read from the placement and the engines' stats."""
    if placement is None:
        return []
    ready = GaugeMetricFamily("ferry_daemon_ready", "1 when the daemon is ready to serve.")
    ready.add_metric([], 1.0 if placement.state == "ready" else 0.0)
    up = GaugeMetricFamily("ferry_engine_up", "1 when the engine answered this scrape.",
                           labels=["engine", "device"])
    restarts = CounterMetricFamily("ferry_engine_restarts", "Times the supervisor restarted an "
                                   "engine that died.", labels=["engine"])
    for eid, e in sorted(placement.engines.items()):
        up.add_metric([eid, str(e.get("device", ""))], 1.0 if eid in stats else 0.0)
        restarts.add_metric([eid], float(e.get("restarts", 0)))
    out: list[Metric] = [ready, up, restarts, _model_ready(placement)]
    out += _per_engine(stats)
    out += _per_model(stats)
    out += _diffusion(stats)
    return out


def _model_ready(placement: P.Placement) -> Metric:
    fam = GaugeMetricFamily("ferry_model_ready", "1 when a model version is serving.",
                            labels=["model", "version"])
    for name, m in sorted(placement.models.items()):
        for ver, v in sorted(m.get("versions", {}).items()):
            fam.add_metric([name, ver], 1.0 if v.get("state") == "ready" else 0.0)
    return fam


def _per_engine(stats: dict[str, dict[str, Any]]) -> list[Metric]:
    pending = GaugeMetricFamily("ferry_engine_pending_requests", "Requests an engine holds.",
                                labels=["engine"])
    counters = {key: CounterMetricFamily(name, doc, labels=["engine"])
                for key, name, doc in _ENGINE_COUNTERS}
    arena = {key: GaugeMetricFamily(name, doc, labels=["engine"])
             for key, name, doc in _ARENA_GAUGES}
    for eid, s in sorted(stats.items()):
        pending.add_metric([eid], float(s.get("pending", 0)))
        for key, counter in counters.items():
            counter.add_metric([eid], float(s.get(key, 0)))
        for key, gauge in arena.items():
            if key in s.get("arena", {}):
                gauge.add_metric([eid], float(s["arena"][key]))
    return [pending, *counters.values(), *arena.values()]


def _per_model(stats: dict[str, dict[str, Any]]) -> list[Metric]:
    labels = ["engine", "model", "version"]
    gauges = {key: GaugeMetricFamily(name, doc, labels=labels) for key, name, doc in _MODEL_GAUGES}
    counters = {key: CounterMetricFamily(name, doc, labels=labels)
                for key, name, doc in _MODEL_COUNTERS}
    usage = GaugeMetricFamily("ferry_kv_cache_usage_ratio", "Share of KV-cache blocks held by "
                              "sequences.", labels=labels)
    for eid, s in sorted(stats.items()):
        for key, model_stats in sorted(s.get("models", {}).items()):
            name, _, ver = key.rpartition(":")
            values = [eid, name, ver]
            for table in (gauges, counters):
                for stat, fam in table.items():
                    value = model_stats.get(stat)
                    if isinstance(value, (int, float)):
                        fam.add_metric(values, float(value))
            total = model_stats.get("kv_blocks_total")
            if isinstance(total, (int, float)) and total > 0:
                usage.add_metric(values, float(model_stats.get("kv_blocks_used", 0)) / total)
    return [fam for fam in (*gauges.values(), *counters.values(), usage) if fam.samples]


def _diffusion(stats: dict[str, dict[str, Any]]) -> list[Metric]:
    labels = ["engine", "model", "version"]
    counters = {key: CounterMetricFamily(name, doc, labels=labels)
                for key, name, doc in _DIFFUSION_COUNTERS}
    gauges = {key: GaugeMetricFamily(name, doc, labels=labels)
              for key, name, doc in _DIFFUSION_GAUGES}
    histograms = {key: HistogramMetricFamily(name, doc, labels=labels)
                  for key, name, doc in _DIFFUSION_HISTOGRAMS}
    outcomes = CounterMetricFamily("ferry_diffusion_requests", "Generation requests that "
                                   "ended, by outcome.", labels=[*labels, "outcome"])
    for eid, s in sorted(stats.items()):
        for key, model_stats in sorted(s.get("models", {}).items()):
            latency = model_stats.get("diffusion_latency")
            if not isinstance(latency, dict):
                continue
            name, _, ver = key.rpartition(":")
            values = [eid, name, ver]
            for table in (counters, gauges):
                for stat, fam in table.items():
                    value = model_stats.get(stat)
                    if isinstance(value, (int, float)):
                        fam.add_metric(values, float(value))
            for outcome in _DIFFUSION_OUTCOMES:
                outcomes.add_metric([*values, outcome], float(model_stats.get(outcome, 0)))
            for stat, hist in histograms.items():
                h = latency.get(stat)
                if isinstance(h, dict):
                    hist.add_metric(values, cumulative_buckets(h), float(h["sum"]))
    return [fam for fam in (*counters.values(), outcomes, *gauges.values(),
                            *histograms.values()) if fam.samples]


# -- GPUs (NVML) --------------------------------------------------------------------------------

_nvml_state: dict[str, Any] = {}


def _nvml() -> Any | None:
    """The pynvml module, initialised once per process; None without it or without a driver."""
    if "module" not in _nvml_state:
        _nvml_state["module"] = None
        try:
            import pynvml
            pynvml.nvmlInit()
            _nvml_state["module"] = pynvml
        except ImportError:
            pass
        except Exception as exc:   # pynvml.NVMLError: no driver, no device
            log.info("NVML unavailable, no GPU metrics: %s", exc)
    return _nvml_state["module"]


def gpu_families() -> list[Metric]:
    nv = _nvml()
    if nv is None:
        return []
    labels = ["gpu", "name"]
    util = GaugeMetricFamily("ferry_gpu_utilization_ratio", "Share of time a kernel ran over the "
                             "last sample period.", labels=labels)
    used = GaugeMetricFamily("ferry_gpu_memory_used_bytes", "GPU memory in use.", labels=labels)
    total = GaugeMetricFamily("ferry_gpu_memory_total_bytes", "GPU memory.", labels=labels)
    temp = GaugeMetricFamily("ferry_gpu_temperature_celsius", "GPU die temperature.",
                             labels=labels)
    power = GaugeMetricFamily("ferry_gpu_power_watts", "GPU power draw.", labels=labels)
    try:
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            name = nv.nvmlDeviceGetName(h)
            values = [str(i), name.decode() if isinstance(name, bytes) else str(name)]
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            util.add_metric(values, nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0)
            used.add_metric(values, float(mem.used))
            total.add_metric(values, float(mem.total))
            temp.add_metric(values, float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)))
            power.add_metric(values, nv.nvmlDeviceGetPowerUsage(h) / 1000.0)   # mW → W
    except Exception as exc:   # a GPU fallen off the bus must not fail the scrape
        log.warning("reading GPU metrics failed: %s", exc)
        return []
    return [util, used, total, temp, power]
