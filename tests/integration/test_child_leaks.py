"""Children that die leave nothing behind in the survivors (issue 13.5): the blocks an engine
lent to a SIGKILLed HTTP worker come back, the engine unmaps that worker's arena, and HTTP
workers unmap the arenas of engines that died, and so for the ZMQ frontend. Five kills of each
kind: the figures are flat."""
from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from daemon.errors import FerryError
from frontends.client import FerryClient
from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon, request_json, wait_until

X = np.random.default_rng(1).random((64, 64), dtype=np.float32)
KILLS = int(os.environ.get("FERRY_TEST_KILLS", "5"))   # the 10: FERRY_TEST_KILLS=10


@pytest.fixture()
def leak_daemon(demo_models, tmp_path_factory):
    # every tensor through shared memory, so each reply lends the worker an engine block
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, ("digits",)), workers=1,
               extra_config="[shm]\ninline_threshold_kb = 0\n").start()
    yield d
    d.stop(check=False)


def _infer(d: Daemon) -> None:
    body = {"inputs": [{"name": "pixels", "shape": [64, 64], "datatype": "FP32",
                        "data": X.reshape(-1).tolist()}]}
    req = urllib.request.Request(d.url + "/v2/models/digits/infer", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    code, answer = request_json(req, timeout=30)
    assert code == 200, answer


def _engine_blocks(d: Daemon) -> int:
    client = FerryClient(d.zmq_endpoint, timeout_s=30)
    try:
        (engine,) = client.stats()["engines"]
        return engine["arena"]["blocks"]
    finally:
        client.sock.close(0)


def _figures(pid: int) -> tuple[int, int]:
    """(open descriptors, Ferry segments mapped) of one process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    maps = {line.split(None, 5)[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if "/dev/shm/ferry-" in line}
    return fds, len(maps)


def _within(now: tuple[int, int], baseline: tuple[int, int]) -> bool:
    return now[0] <= baseline[0] and now[1] <= baseline[1]


def _one_child(d: Daemon, role: str, not_pid: int | None = None) -> int:
    def one() -> int | None:
        pids = d.child_pids(role)            # read once: a child may come or go between reads
        return pids[0] if len(pids) == 1 and pids[0] != not_pid else None
    return wait_until(one, 60, f"a {role} child")


def _ready(d: Daemon) -> None:
    wait_until(lambda: _try_infer(d), 60, "the daemon serving again")


def _try_infer(d: Daemon) -> bool:
    try:
        _infer(d)
        return True
    except (AssertionError, OSError):
        return False


def test_killed_http_workers_leave_no_blocks_or_maps_in_the_engine(leak_daemon):
    d = leak_daemon
    engine = _one_child(d, "engine")
    _ready(d)
    _infer(d)     # the worker now holds one lent block until its next request
    baseline = _figures(engine)
    worker = None
    for _ in range(KILLS):
        worker = _one_child(d, "http", not_pid=worker)
        _ready(d)
        _infer(d)
        os.kill(worker, signal.SIGKILL)
    worker = _one_child(d, "http", not_pid=worker)
    # the last request's block was lent to a dead worker: the engine takes it back
    wait_until(lambda: _engine_blocks(d) == 0, 15, "the dead workers' blocks freed")
    _ready(d)
    wait_until(lambda: _within(_figures(engine), baseline), 15,
               f"engine fds/maps back to {baseline} (now {_figures(engine)})")
    assert d.child_pids("engine") == [engine]


def test_killed_engines_leave_no_maps_in_http_workers(leak_daemon):
    d = leak_daemon
    worker = _one_child(d, "http")
    _ready(d)
    baseline = _figures(worker)
    engine = None
    for _ in range(KILLS):
        engine = _one_child(d, "engine", not_pid=engine)
        _ready(d)
        os.kill(engine, signal.SIGKILL)
    _one_child(d, "engine", not_pid=engine)
    _ready(d)
    wait_until(lambda: _within(_figures(worker), baseline), 15,
               f"worker fds/maps back to {baseline} (now {_figures(worker)})")
    assert d.child_pids("http") == [worker]


def _infer_zmq(d: Daemon) -> None:
    client = FerryClient(d.zmq_endpoint, timeout_s=30)
    try:
        out = client.infer("digits", {"pixels": X})
        assert next(iter(out.values())).shape[0] == 64
    finally:
        client.sock.close(0)


def _try_infer_zmq(d: Daemon) -> bool:
    try:
        _infer_zmq(d)
        return True
    except (AssertionError, OSError, FerryError):
        return False


def test_a_killed_zmq_frontend_leaves_no_blocks_or_maps_in_the_engine(leak_daemon):
    d = leak_daemon
    engine = _one_child(d, "engine")
    _ready(d)
    wait_until(lambda: _try_infer_zmq(d), 60, "the ZMQ frontend serving")
    baseline = _figures(engine)
    frontend = None
    for _ in range(KILLS):
        frontend = _one_child(d, "zmq", not_pid=frontend)
        wait_until(lambda: _try_infer_zmq(d), 60, "the ZMQ frontend serving again")
        os.kill(frontend, signal.SIGKILL)
    _one_child(d, "zmq", not_pid=frontend)
    wait_until(lambda: _try_infer_zmq(d), 60, "the ZMQ frontend serving again")
    # Blocks lent to the dead frontends come back; the engine unmaps their arenas.
    wait_until(lambda: _engine_blocks(d) == 0, 15, "the dead frontends' blocks freed")
    wait_until(lambda: _within(_figures(engine), baseline), 15,
               f"engine fds/maps back to {baseline} (now {_figures(engine)})")
    assert d.child_pids("engine") == [engine]
