"""Engine and frontend crashes under load: nothing accepted is lost, nothing leaks."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import numpy as np
import pytest

from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon, ferry_segments, http_get, orphan_segments, \
    wait_until


@pytest.fixture()
def fault_daemon(demo_models, tmp_path_factory):
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, ("digits",)), workers=2).start()
    yield d
    d.stop(check=False)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from daemon.demo import digits_split
    _, x, _, y = digits_split()
    return x.astype(np.float32), y


async def _load(url: str, x: np.ndarray, stop: asyncio.Event, results: list, clients: int):
    async def one_client(k: int) -> None:
        async with aiohttp.ClientSession() as s:
            i = k
            while not stop.is_set():
                row = i % len(x)
                body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                                    "data": x[row].tolist()}]}
                async with s.post(url, json=body) as r:
                    payload = await r.json(content_type=None)
                    results.append((row, r.status, payload))
                i += clients
    await asyncio.gather(*(one_client(k) for k in range(clients)))


def test_engine_killed_twice_under_load_loses_nothing(fault_daemon):
    d = fault_daemon
    x, y = _digits()
    expected = {}
    url = d.url + "/v2/models/digits/infer"
    results: list = []
    recoveries: list[float] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        load = asyncio.create_task(_load(url, x, stop, results, clients=32))
        for _ in range(2):
            await asyncio.sleep(0.5)   # let traffic build up before the crash
            (engine_pid,) = d.child_pids("engine")
            os.kill(engine_pid, signal.SIGKILL)
            t0 = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(None, lambda: wait_until(
                lambda: d.child_pids("engine") and d.child_pids("engine") != [engine_pid]
                and http_get(d.url + "/readyz")[0] == 200, 60, "engine restart"))
            recoveries.append(time.monotonic() - t0)
        await asyncio.sleep(0.3)
        stop.set()
        await load
    asyncio.run(scenario())
    assert len(results) >= 200, len(results)
    failures = [(s, p) for _, s, p in results if s != 200]
    errors = [line for line in d.log().splitlines() if '"exc"' in line or "Traceback" in line]
    assert not failures, (failures[:3], errors[:3])
    for row, _, payload in results:
        probs = np.asarray(payload["outputs"][0]["data"], dtype=np.float32)
        expected.setdefault(row, probs)
        np.testing.assert_allclose(probs, expected[row], rtol=1e-4, atol=1e-5)
    print(f"\nrecovery times: {', '.join(f'{r:.2f}s' for r in recoveries)}; "
          f"{len(results)} requests, 0 failed")
    code = d.stop()
    assert code == 0
    assert not orphan_segments()
    assert not [p for p in d.runtime_dir.iterdir() if p.suffix in (".sock", ".zmq")]


def test_frontend_killed_is_restarted_and_others_keep_serving(fault_daemon):
    d = fault_daemon
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                        "data": [0.0] * 64}]}
    victim = d.child_pids("http")[0]
    os.kill(victim, signal.SIGKILL)

    async def hammer() -> list[int]:
        async with aiohttp.ClientSession() as s:
            out = []
            for _ in range(20):
                try:
                    async with s.post(d.url + "/v2/models/digits/infer", json=body) as r:
                        out.append(r.status)
                except aiohttp.ClientConnectionError:
                    out.append(-1)   # a connection that the killed worker had accepted
            return out
    statuses = asyncio.run(hammer())
    assert statuses.count(200) >= 15, statuses
    wait_until(lambda: len(d.child_pids("http")) == 2 and victim not in d.child_pids("http"),
               30, "the frontend restart")
    assert not orphan_segments()


def test_sigterm_leaves_no_segments_or_sockets(demo_models, tmp_path_factory):
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, ("digits",)), workers=1).start()
    mine = {s for s in ferry_segments() if any(s.endswith(f"-{p}") for p in
                                               d.child_pids("") + [d.proc.pid])}
    assert mine, "the daemon should own shared-memory arenas while running"
    assert d.stop() == 0
    assert not (mine & ferry_segments())
    assert not [p for p in d.runtime_dir.iterdir()]


def test_supervisor_killed_children_follow_and_next_start_reclaims(demo_models,
                                                                   tmp_path_factory):
    repo = tensor_repo(demo_models, tmp_path_factory, ("digits",))
    d = Daemon(repo, workers=1).start()
    children = d.child_pids("")
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait(10)
    wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in children), 10,
               "children to die with the supervisor")
    d2 = Daemon(repo, workers=1).start()
    try:
        assert not orphan_segments()
    finally:
        assert d2.stop() == 0
