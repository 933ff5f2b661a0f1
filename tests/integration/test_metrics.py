"""`/metrics` of a real daemon with two HTTP workers: every process aggregated, labels bounded,
names after the Prometheus conventions, engine gauges read at scrape time."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from frontends.client import FerryClient
from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon, http_get, orphan_segments, wait_until

pytestmark = pytest.mark.timeout(120)

INFER = "/v2/models/{model}/infer"
PIXELS = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                      "data": [float(i % 16) for i in range(64)]}]}


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, ("digits",)), workers=2,
               extra_config="[engines]\nrestart_backoff_s = [0.2]\n").start()
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def scrape(d: Daemon) -> dict:
    with urllib.request.urlopen(d.url + "/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, sample: str, **labels: str) -> float:
    family = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    return sum(s.value for s in fams[family].samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


async def _requests(url: str, n: int, headers: dict | None = None) -> list[int]:
    async def one() -> int:
        # a connection per request, so SO_REUSEPORT spreads them over both workers
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            async with s.post(url, json=PIXELS, headers=headers or {}) as r:
                await r.read()
                return r.status
    return list(await asyncio.gather(*(one() for _ in range(n))))


def _per_process(metrics_dir: Path, pid: int, tmp: Path) -> dict:
    """What one process alone recorded: its own files through a collector of their own."""
    own = tmp / str(pid)
    own.mkdir()
    for f in metrics_dir.glob(f"*_{pid}.db"):
        shutil.copy(f, own / f.name)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(own))
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


def test_requests_from_both_workers_are_counted_once(ferry, tmp_path):
    before = scrape(ferry)
    base = value(before, "ferry_requests_total", route=INFER, model="digits", status="200")
    statuses = asyncio.run(_requests(ferry.url + "/v2/models/digits/infer", 40))
    assert statuses == [200] * 40
    for _ in range(3):   # whichever worker answers the scrape, it answers for both
        fams = scrape(ferry)
        assert value(fams, "ferry_requests_total", route=INFER, model="digits",
                     status="200") == base + 40
    assert value(fams, "ferry_request_duration_seconds_count", route=INFER,
                 model="digits") >= 40
    per_worker = [value(_per_process(ferry.runtime_dir / "metrics", pid, tmp_path),
                        "ferry_requests_total", route=INFER, model="digits", status="200")
                  for pid in ferry.child_pids("http")]
    assert len(per_worker) == 2 and all(n > 0 for n in per_worker), per_worker
    assert sum(per_worker) == base + 40
    # engine-reported queue time and batch size, one observation per tensor request
    assert value(fams, "ferry_queue_duration_seconds_count", model="digits") >= 40
    assert value(fams, "ferry_batch_size_count", model="digits") >= 40
    assert value(fams, "ferry_batch_size_sum", model="digits") >= 40


def test_status_and_unmatched_routes_keep_labels_bounded(ferry):
    asyncio.run(_requests(ferry.url + "/v2/models/nope/infer", 2))
    for path in ("/no/such/a", "/no/such/b", "/v2/models/digits/versions/x/infer"):
        http_get(ferry.url + path)
    fams = scrape(ferry)
    assert value(fams, "ferry_requests_total", route=INFER, status="404") >= 2
    labels = {(s.labels["route"], s.labels["model"]) for s in fams["ferry_requests"].samples}
    assert ("unmatched", "") in labels
    assert not any("/no/such" in route or "nope" in route or model == "nope"
                   for route, model in labels), labels


def test_zmq_frontend_requests_are_aggregated_too(ferry):
    before = value(scrape(ferry), "ferry_queue_duration_seconds_count", model="digits")
    import numpy as np
    with FerryClient(ferry.zmq_endpoint, timeout_s=30) as c:
        for _ in range(5):
            c.infer("digits", {"pixels": np.zeros((2, 64), np.float32)})
    fams = scrape(ferry)
    assert value(fams, "ferry_queue_duration_seconds_count", model="digits") == before + 5
    assert value(fams, "ferry_batch_size_sum", model="digits") >= 10


def test_names_and_types_follow_prometheus_conventions(ferry):
    fams = scrape(ferry)
    ours = {n: f for n, f in fams.items() if n.startswith("ferry_")}
    assert len(ours) == len(fams), set(fams) - set(ours)
    for name, fam in ours.items():
        assert name == name.lower() and "__" not in name, name
        assert not any(unit in name for unit in ("_ms", "milli", "micro", "_us_", "_kb", "_mb"))
        if fam.type == "counter":
            assert all(s.name == name + "_total" or s.name == name + "_created"
                       for s in fam.samples), name
        if fam.type == "histogram":
            assert name.endswith(("_seconds", "_size")), name
        if "seconds" in name or "bytes" in name:
            assert name.endswith(("_seconds", "_bytes")), name
    for expected in ("ferry_requests", "ferry_request_duration_seconds",
                     "ferry_queue_duration_seconds", "ferry_batch_size",
                     "ferry_http_requests_in_flight", "ferry_engine_restarts",
                     "ferry_engine_up", "ferry_shm_arena_size_bytes",
                     "ferry_shm_arena_used_bytes", "ferry_model_ready", "ferry_daemon_ready"):
        assert expected in ours, expected
    assert ours["ferry_requests"].type == "counter"
    assert ours["ferry_request_duration_seconds"].type == "histogram"
    assert value(fams, "ferry_shm_arena_size_bytes", engine="cpu") >= 1 << 20
    assert value(fams, "ferry_engine_up", engine="cpu") == 1
    assert not any(n.startswith("ferry_gpu_") for n in ours)   # no NVML here: nothing at all
    assert value(fams, "ferry_model_ready", model="digits", version="1") == 1


def test_engine_restarts_are_counted(ferry):
    before = value(scrape(ferry), "ferry_engine_restarts_total", engine="cpu")
    (engine,) = ferry.child_pids("engine")
    os.kill(engine, signal.SIGKILL)
    wait_until(lambda: value(scrape(ferry), "ferry_engine_restarts_total",
                             engine="cpu") == before + 1, 30, "the restart to be counted")
    wait_until(lambda: http_get(ferry.url + "/readyz")[0] == 200, 30, "the engine to come back")
    fams = scrape(ferry)
    assert value(fams, "ferry_engine_up", engine="cpu") == 1
    assert value(fams, "ferry_daemon_ready") == 1
    assert asyncio.run(_requests(ferry.url + "/v2/models/digits/infer", 3)) == [200] * 3


def test_dead_workers_gauges_are_dropped_but_counts_stay(ferry):
    fams = scrape(ferry)
    total = value(fams, "ferry_requests_total", route=INFER, model="digits", status="200")
    victim = ferry.child_pids("http")[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(ferry.child_pids("http")) == 2 and victim not in
               ferry.child_pids("http"), 30, "the worker to be replaced")
    metrics_dir = ferry.runtime_dir / "metrics"
    wait_until(lambda: not list(metrics_dir.glob(f"gauge_livesum_{victim}.db")), 10,
               "the dead worker's live gauge file to go")
    fams = scrape(ferry)
    assert value(fams, "ferry_requests_total", route=INFER, model="digits",
                 status="200") == total
    assert value(fams, "ferry_http_requests_in_flight") == 1     # the scrape itself
