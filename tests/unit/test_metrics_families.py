"""The metrics code without a daemon: families built from engine stats, the stream timer, the
HTTP middleware's labels, and the multiprocess directory the supervisor prepares."""
from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from daemon import metrics
from daemon import protocol as P
from frontends.http.metrics import engine_families, gpu_families, metrics_middleware

pytestmark = pytest.mark.timeout(30)


def _placement(state: str = "ready") -> P.Placement:
    engines = {"cpu": {"endpoint": "ipc://x", "device": "cpu", "generation": 3, "alive": True,
                       "pid": 1, "restarts": 2},
               "cuda0": {"endpoint": "ipc://y", "device": "cuda:0", "generation": 1,
                         "alive": False, "pid": 2, "restarts": 0}}
    models = {"lm": {"versions": {"1": {"state": "ready"}}},
              "digits": {"versions": {"1": {"state": "draining"}, "2": {"state": "ready"}}}}
    return P.Placement(7, engines, models, state)


STATS = {"cpu": {"pending": 3, "requests": 10, "errors": 1,
                 "arena": {"size": 1 << 20, "used": 4096, "high_water": 8192, "blocks": 2},
                 "models": {"lm:1": {"kv_blocks_total": 100, "kv_blocks_used": 25,
                                     "kv_blocks_cached": 5, "prefix_cache_hit_rate": 0.5,
                                     "prefix_cache_query_tokens": 40,
                                     "prefix_cache_hit_tokens": 20, "running": 2, "waiting": 1,
                                     "preemptions": 0},
                            "digits:2": {"queued": 4, "batch_sizes": {"1": 3}}}}}


def _samples(families) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in families for s in fam.samples}


def test_engine_families_from_placement_and_stats():
    got = _samples(engine_families(_placement(), STATS))
    assert got[("ferry_daemon_ready", ())] == 1
    assert got[("ferry_engine_up", (("device", "cpu"), ("engine", "cpu")))] == 1
    # alive in placement but no stats answer (hung, or gone mid-scrape): down
    assert got[("ferry_engine_up", (("device", "cuda:0"), ("engine", "cuda0")))] == 0
    assert got[("ferry_engine_restarts_total", (("engine", "cpu"),))] == 2
    assert got[("ferry_engine_pending_requests", (("engine", "cpu"),))] == 3
    assert got[("ferry_engine_errors_total", (("engine", "cpu"),))] == 1
    assert got[("ferry_shm_arena_used_bytes", (("engine", "cpu"),))] == 4096
    assert got[("ferry_shm_arena_size_bytes", (("engine", "cpu"),))] == 1 << 20
    lm = (("engine", "cpu"), ("model", "lm"), ("version", "1"))
    assert got[("ferry_kv_cache_blocks_used", lm)] == 25
    assert got[("ferry_kv_cache_usage_ratio", lm)] == 0.25
    assert got[("ferry_prefix_cache_hit_ratio", lm)] == 0.5
    assert got[("ferry_prefix_cache_hit_tokens_total", lm)] == 20
    digits = (("engine", "cpu"), ("model", "digits"), ("version", "2"))
    assert got[("ferry_model_queued_requests", digits)] == 4
    assert ("ferry_kv_cache_blocks_used", digits) not in got   # not an LLM: nothing invented
    assert got[("ferry_model_ready", (("model", "digits"), ("version", "1")))] == 0
    assert got[("ferry_model_ready", (("model", "digits"), ("version", "2")))] == 1


def test_no_placement_no_families_and_degraded_is_not_ready():
    assert engine_families(None, {}) == []
    got = _samples(engine_families(_placement("degraded"), {}))
    assert got[("ferry_daemon_ready", ())] == 0
    assert not any(name == "ferry_shm_arena_used_bytes" for name, _ in got)


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="an NVIDIA driver is present")
def test_gpu_families_are_empty_without_a_gpu(monkeypatch):
    from frontends.http import metrics as http_metrics
    monkeypatch.setattr(http_metrics, "_nvml_state", {})
    assert gpu_families() == []          # pynvml present or not, no driver: nothing at all
    monkeypatch.setattr(http_metrics, "_nvml_state", {})
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)   # not installed
    assert gpu_families() == []


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_stream_timer_records_ttft_itl_and_tokens():
    model = "unit-stream"
    timer = metrics.StreamTimer(model, prompt_len=7)
    timer.tokens(P.Tokens("r", [], finished=False))            # nothing yet: no first token
    assert _value("ferry_time_to_first_token_seconds_count", model=model) == 0
    timer.tokens(P.Tokens("r", [5], prompt_tokens=9))
    timer.tokens(P.Tokens("r", [6, 7, 8]))                     # three tokens in one message
    timer.tokens(P.Tokens("r", [9], finished=True))
    assert _value("ferry_time_to_first_token_seconds_count", model=model) == 1
    assert _value("ferry_inter_token_latency_seconds_count", model=model) == 4
    assert _value("ferry_generation_tokens_total", model=model) == 5
    assert _value("ferry_prompt_tokens_total", model=model) == 9   # the engine's count wins
    other = metrics.StreamTimer("unit-stream-2", prompt_len=7)
    other.tokens(SimpleNamespace(token_ids=[1], prompt_tokens=0))
    assert _value("ferry_prompt_tokens_total", model="unit-stream-2") == 7


def test_observe_infer_converts_microseconds():
    metrics.observe_infer("unit-infer", queue_us=1500, compute_us=250, batch_size=8)
    metrics.observe_infer("unit-infer", queue_us=0, compute_us=0, batch_size=0)
    assert _value("ferry_queue_duration_seconds_sum", model="unit-infer") == 0.0015
    assert _value("ferry_queue_duration_seconds_count", model="unit-infer") == 2
    assert _value("ferry_batch_size_count", model="unit-infer") == 1   # 0: not reported
    assert _value("ferry_batch_size_sum", model="unit-infer") == 8


def test_middleware_labels_route_template_model_and_status():
    async def infer(request: web.Request) -> web.Response:
        metrics.note_model("unit-mw")        # what Dispatcher.resolve does deep in a handler
        if request.match_info["model"] == "bad":
            raise web.HTTPBadRequest()
        return web.json_response({})

    async def go() -> None:
        app = web.Application(middlewares=[metrics_middleware])
        app.router.add_post("/unit/{model}/infer", infer)
        async with TestClient(TestServer(app)) as client:
            for model in ("a", "b", "bad"):
                (await client.post(f"/unit/{model}/infer")).release()
            (await client.get("/unit/nowhere/at/all")).release()
    asyncio.run(go())
    route = "/unit/{model}/infer"
    assert _value("ferry_requests_total", route=route, model="unit-mw", status="200") == 2
    assert _value("ferry_requests_total", route=route, model="unit-mw", status="400") == 1
    assert _value("ferry_requests_total", route="unmatched", model="", status="404") >= 1
    assert _value("ferry_request_duration_seconds_count", route=route, model="unit-mw") == 3
    assert metrics._MODEL.get() is None     # the label slot never leaks out of a request


def test_prepare_dir_empties_and_exports(tmp_path, monkeypatch):
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    stale = tmp_path / "metrics" / "counter_1.db"
    stale.parent.mkdir()
    stale.write_bytes(b"old run")
    path = metrics.prepare_dir(tmp_path)
    assert path == tmp_path / "metrics" and list(path.iterdir()) == []
    assert os.environ[metrics.MULTIPROC_ENV] == str(path)
    live = path / "gauge_livesum_4242.db"
    live.write_bytes(b"")
    kept = path / "counter_4242.db"
    kept.write_bytes(b"")
    metrics.mark_dead(4242)
    assert not live.exists() and kept.exists()     # counts of the dead stay in the totals
    metrics.remove_dir(tmp_path)
    assert not path.exists()
    metrics.mark_dead(4242)                         # no directory: a no-op, not an error
