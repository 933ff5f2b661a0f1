"""Operating `ferry serve` as systemd does: the notify protocol (READY, STATUS, WATCHDOG,
RELOADING, STOPPING) heard on a real AF_UNIX datagram socket, health-driven watchdog pings, the
degraded state, SIGHUP reloads under load and SIGTERM drains of requests in flight."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from daemon.children import OMP_SPINCOUNT, default_threads
from tests.integration.lifecycle_models import slow_loop_repo
from tests.integration.daemon_proc import Daemon, free_port, http_get, orphan_segments, \
    wait_until

pytestmark = pytest.mark.timeout(180)

WATCHDOG_USEC = 1_000_000          # systemd's WatchdogSec=1s: pings every 0.5 s
PIXELS = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                      "data": [float(i % 16) for i in range(64)]}]}


class NotifyListener:
    """Stands in for systemd: binds NOTIFY_SOCKET and records every datagram with its time."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fyn", dir="/tmp"))
        self.path = str(self.dir / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.on_ready = None                 # called in the listener thread on READY=1
        self.ready_probe: object = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))
            if fields.get("READY") == "1" and self.on_ready is not None:
                callback, self.on_ready = self.on_ready, None
                self.ready_probe = callback()

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}

    def times(self, key: str, value: str | None = None, since: float = 0.0) -> list[float]:
        return [t for t, f in list(self.messages)
                if key in f and (value is None or f[key] == value) and t >= since]

    def statuses(self, since: float = 0.0) -> list[str]:
        return [f["STATUS"] for t, f in list(self.messages) if "STATUS" in f and t >= since]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _copy_repo(demo_models: Path, tmp: Path, names: tuple[str, ...]) -> Path:
    """A private copy: these tests edit model.toml files, which the demo repo must never see."""
    root = tmp / "repo"
    for name in names:
        shutil.copytree(demo_models / name, root / name)
    return root


def _probe_readyz(url: str):
    """Run at the moment READY=1 arrives: the HTTP side must already say ready."""
    def probe() -> tuple[int, dict]:
        deadline = time.monotonic() + 2.0    # the placement PUB reaches workers within ms
        while True:
            status, body = http_get(url + "/readyz", timeout=2.0)
            if status == 200 or time.monotonic() > deadline:
                return status, body
            time.sleep(0.01)
    return probe


@pytest.fixture(scope="module")
def notified(demo_models, tmp_path_factory):
    """A daemon on a copy of `digits`, run with a notify socket and a 1 s watchdog."""
    os.environ.pop("WATCHDOG_PID", None)     # would name another process: watchdog off
    listener = NotifyListener()
    # poll_interval_s is short so the SIGHUP test sees control_mode = "poll" take effect soon
    d = Daemon(_copy_repo(demo_models, tmp_path_factory.mktemp("ops"), ("digits",)), workers=1,
               env=listener.env(), port=free_port(),
               extra_config="[engines]\nrestart_backoff_s = [1.5]\n"
                            "[repository]\npoll_interval_s = 0.2\n")
    listener.on_ready = _probe_readyz(f"http://127.0.0.1:{d.port}")
    try:
        d.start()
        yield d, listener
        stopped_at = time.monotonic()
        assert d.stop() == 0, d.log()[-4000:]
        assert listener.times("STOPPING", "1", since=stopped_at), listener.messages[-5:]
        assert not orphan_segments(), "shared-memory segments leaked"
    finally:
        d.stop(check=False)
        listener.close()


def test_ready_only_once_models_are_loaded(notified):
    d, listener = notified
    ready = listener.times("READY", "1")
    assert len(ready) == 1, listener.messages
    before = [f for t, f in listener.messages if t < ready[0]]
    statuses = [f.get("STATUS") for f in before]
    assert {"starting engines", "loading models", "starting frontends"} <= set(statuses), statuses
    assert not any("WATCHDOG" in f for f in before), "watchdog pings before READY=1"
    # The probe runs in the listener thread, which may still be waiting on it when d.start()
    # (its own /readyz poll) has returned.
    wait_until(lambda: listener.ready_probe is not None, 5.0, "the /readyz probe at READY=1")
    status, body = listener.ready_probe
    assert status == 200, body
    assert body == {"status": "ready", "models": {"digits": {"1": "ready"}}}
    ready_fields = next(f for t, f in listener.messages if t == ready[0])
    assert ready_fields["STATUS"].startswith("ready: 1 model version(s) ready"), ready_fields


def test_engines_wait_for_work_with_a_bounded_spin(notified):
    """Engines get Ferry's OpenMP defaults (a spinning wait, and a thread on every core,
    collapse on a shared host): the spin limit, and the usable CPUs less one as threads."""
    d, _ = notified
    for pid in d.child_pids("engine"):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"GOMP_SPINCOUNT={OMP_SPINCOUNT}".encode() in environ, pid
        threads = [e for e in environ if e.startswith(b"OMP_NUM_THREADS=")]
        want = os.environ.get("OMP_NUM_THREADS", str(default_threads()))   # an operator's wins
        assert threads == [f"OMP_NUM_THREADS={want}".encode()], threads


def test_watchdog_pings_at_the_configured_interval(notified):
    _, listener = notified
    t0 = time.monotonic()
    wait_until(lambda: len(listener.times("WATCHDOG", "1", since=t0)) >= 3, 2.5,
               "three WATCHDOG=1 pings")
    wait_until(lambda: len(listener.times("WATCHDOG", "1", since=t0)) >= 4, 2.0,
               "a fourth WATCHDOG=1 ping")
    gaps = np.diff(listener.times("WATCHDOG", "1", since=t0))
    # half of WATCHDOG_USEC plus the health check's round trip: not the full timeout
    assert all(g > 0.3 for g in gaps) and 0.4 < float(np.median(gaps)) < 0.8, gaps


def test_watchdog_pings_follow_engine_health(notified):
    d, listener = notified
    (engine,) = d.child_pids("engine")
    os.kill(engine, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        # A hung engine misses its health checks: pings stop though the supervisor runs on.
        wait_until(lambda: time.monotonic() - max(listener.times("WATCHDOG", "1")) > 1.6, 5.0,
                   "watchdog pings to stop")
        # (one check may have been answered just before the stop)
        assert len(listener.times("WATCHDOG", "1", since=stopped + 1.0)) == 0
    finally:
        os.kill(engine, signal.SIGCONT)
    resumed = time.monotonic()
    wait_until(lambda: listener.times("WATCHDOG", "1", since=resumed), 3.0,
               "watchdog pings to resume")
    assert "did not answer its health check" in d.log()


def test_request_id_travels_to_the_engine_log(notified):
    d, _ = notified
    bad = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 63],
                       "data": [0.0] * 63}]}

    async def go() -> tuple[int, dict, str]:
        async with aiohttp.ClientSession() as s:
            async with s.post(d.url + "/v2/models/digits/infer", json=bad,
                              headers={"X-Request-ID": "ops-trace-42"}) as r:
                return r.status, await r.json(), r.headers["X-Request-ID"]
    status, body, header = asyncio.run(go())
    assert status == 400 and header == "ops-trace-42" and body["request_id"] == "ops-trace-42"

    def engine_line() -> dict | None:
        for line in d.log().splitlines():
            if "ops-trace-42" in line and '"role": "engine-' in line:
                return json.loads(line)
        return None
    line = wait_until(engine_line, 5.0, "the engine's log line for the request")
    assert line["request_id"] == "ops-trace-42" and line["code"] == "invalid_shape", line


def test_engine_death_is_degraded_then_ready(notified):
    d, listener = notified
    (engine,) = d.child_pids("engine")
    killed = time.monotonic()
    os.kill(engine, signal.SIGKILL)
    # restart_backoff_s = 1.5 keeps the engine down long enough to look
    status, body = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(
        http_get(d.url + "/readyz")), 1.4, "readyz to report the dead engine", interval=0.02)
    assert body["status"] == "degraded", body
    wait_until(lambda: any(s.startswith("degraded") for s in listener.statuses(since=killed)),
               2.0, "STATUS=degraded")
    assert "0/1 engine(s) up" in next(s for s in listener.statuses(since=killed)
                                      if s.startswith("degraded"))
    wait_until(lambda: http_get(d.url + "/readyz")[0] == 200, 30.0, "the engine to come back")
    wait_until(lambda: any(s.startswith("ready") for s in listener.statuses(since=killed)), 5.0,
               "STATUS=ready after the restart")


async def _hammer(url: str, stop: asyncio.Event, results: list, clients: int = 8) -> None:
    async def client() -> None:
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                try:
                    async with s.post(url, json=PIXELS) as r:
                        results.append((r.status, await r.text()))
                except aiohttp.ClientError as exc:
                    results.append((0, repr(exc)))
    await asyncio.gather(*(client() for _ in range(clients)))


def test_sighup_applies_config_and_models_with_no_failed_request(notified):
    d, listener = notified
    repo = d.repo
    toml = repo / "digits" / "1" / "model.toml"
    toml.write_text(toml.read_text().replace("max_batch_size = 64", "max_batch_size = 16"))
    d.write_config(d.extra_config.replace("[repository]\n",
                                          '[repository]\ncontrol_mode = "poll"\n'))
    results: list = []

    async def scenario() -> None:
        stop = asyncio.Event()
        load = asyncio.create_task(_hammer(d.url + "/v2/models/digits/infer", stop, results))
        await asyncio.sleep(0.3)             # traffic flowing before the reload
        sent = time.monotonic()
        d.proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(wait_until, lambda: listener.times("READY", "1", since=sent),
                                30.0, "READY=1 after the reload")
        assert listener.times("RELOADING", "1", since=sent)
        config = await asyncio.to_thread(http_get, d.url + "/v2/models/digits/config")
        assert config[1]["max_batch_size"] == 16, config
        # control_mode = "poll" came from the new file: a model dropped in now gets loaded.
        shutil.copytree(repo / "digits", repo / "digits2")
        await asyncio.to_thread(wait_until, lambda: http_get(d.url + "/readyz")[1].get(
            "models", {}).get("digits2") == {"1": "ready"}, 30.0, "poll mode to load digits2")
        await asyncio.sleep(0.2)
        stop.set()
        await load
    asyncio.run(scenario())
    failed = [r for r in results if r[0] != 200]
    assert len(results) > 50 and not failed, (len(results), failed[:3])
    status, _ = http_get(d.url + "/v2/models/digits2")
    assert status == 200


# -- SIGTERM drains ---------------------------------------------------------------------------



def _in_flight(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for fam in text_string_to_metric_families(text):
        if fam.name == "ferry_http_requests_in_flight":
            return fam.samples[0].value - 1          # not counting the scrape itself
    raise AssertionError("ferry_http_requests_in_flight missing")


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def _drain(d: Daemon, listener: NotifyListener, send_all, n: int = 50,
           exit_timeout_s: float = 60.0) -> list:
    """Start `n` requests, SIGTERM once all are being handled, and collect their answers."""
    done: list = []

    async def scenario() -> None:
        tasks = [asyncio.create_task(send_all(i, done)) for i in range(n)]
        await asyncio.to_thread(wait_until, lambda: _in_flight(d.url) + len(done) >= n, 30.0,
                                "every request to be in flight")
        assert len(done) < n, "the requests finished before the drain began: model too fast"
        term = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(wait_until, lambda: _refused(d.port), 10.0,
                                "new connections to be refused")
        assert len(done) < n, "drain began only after every request had finished"
        assert listener.times("STOPPING", "1", since=term)
        await asyncio.gather(*tasks)
    asyncio.run(scenario())
    assert d.proc.wait(exit_timeout_s) == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"
    return done


def test_sigterm_drains_requests_in_flight(tmp_path):
    listener = NotifyListener()
    d = Daemon(slow_loop_repo(tmp_path / "repo", iterations=150, n=256), workers=2,
               env=listener.env())
    try:
        d.start()

        async def one(i: int, done: list) -> None:
            x = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                             "data": [float(i)] * 4}]}
            # a connection each: a drain must finish them all, not just one keep-alive stream
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                             timeout=aiohttp.ClientTimeout(60)) as s:
                async with s.post(d.url + "/v2/models/slow/infer", json=x) as r:
                    done.append((i, r.status, await r.json()))
        done = _drain(d, listener, one)
        assert sorted(i for i, _, _ in done) == list(range(50))
        bad = [(i, s, b) for i, s, b in done if s != 200 or b["outputs"][0]["data"] != [i] * 4]
        assert not bad, bad[:3]
    finally:
        d.stop(check=False)
        listener.close()


@pytest.mark.timeout(400)
def test_sigterm_drains_generations_in_flight(demo_models, tmp_path):
    """50 OpenAI completions in flight through the LLM engine; the stream metrics too."""
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "smollm2").symlink_to(demo_models / "smollm2")
    listener = NotifyListener()
    d = Daemon(tmp_path / "repo", workers=1, env=listener.env(),
               drain_grace_s=150)  # 50 generations on two busy cores may need > 20 s
    try:
        d.start()

        async def one(i: int, done: list, max_tokens: int = 3) -> None:
            body = {"model": "smollm2", "prompt": f"Count to {i}:", "max_tokens": max_tokens,
                    "temperature": 0, "stream": i == 0}
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(170)) as s:
                async with s.post(d.url + "/v1/completions", json=body) as r:
                    done.append((i, r.status, await r.text()))
        first: list = []
        asyncio.run(one(0, first, 8))        # a streamed one first, for the stream metrics
        assert first[0][1] == 200, first
        with urllib.request.urlopen(d.url + "/metrics", timeout=10) as resp:
            fams = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
        count = lambda name: sum(s.value for s in fams[name].samples  # noqa: E731
                                 if s.name == name + "_count")
        assert count("ferry_time_to_first_token_seconds") == 1
        gen = sum(s.value for s in fams["ferry_generation_tokens"].samples)
        assert 2 <= gen <= 8
        assert 1 <= count("ferry_inter_token_latency_seconds") <= gen - 1
        assert sum(s.value for s in fams["ferry_prompt_tokens"].samples) >= 3
        assert fams["ferry_kv_cache_blocks_total"].samples[0].value > 0
        assert 0 <= fams["ferry_prefix_cache_hit_ratio"].samples[0].value <= 1

        done = _drain(d, listener, one, exit_timeout_s=200)
        bad = [(i, s, t[:200]) for i, s, t in done if s != 200 or '"text"' not in t]
        assert len(done) == 50 and not bad, bad[:3]
    finally:
        d.stop(check=False)
        listener.close()
