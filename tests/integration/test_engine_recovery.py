"""Recovery after a kill -9 of the engine: a restarted engine takes traffic while its LLM is
still loading (the tensor model serves first), a stream in flight is continued once the LLM is
back, an engine that had been serving restarts without a backoff delay, and with
`[engines] standby = "models"` a waiting process with the models loaded takes over."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

import pytest

from daemon.children import STABLE_S
from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon, http_get, request_json, wait_until

PIXELS = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                      "data": [float(i % 16) for i in range(64)]}]}


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, ("digits", "smollm2")), workers=1,
               env={"FERRY_TORCH_THREADS": "1"}).start(timeout_s=240)
    yield d
    d.stop(check=False)


def _digits_ok(url: str) -> bool:
    req = urllib.request.Request(url + "/v2/models/digits/infer", json.dumps(PIXELS).encode(),
                                 {"Content-Type": "application/json"})
    try:
        return request_json(req, timeout=30)[0] == 200
    except OSError:
        return False


def _stream(url: str, out: dict) -> None:
    """A greedy SSE completion; records its pieces, finish reason and any error event."""
    body = {"model": "smollm2", "prompt": "The history of the printing press", "max_tokens": 120,
            "temperature": 0, "ignore_eos": True, "stream": True}
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    out["pieces"], out["errors"] = [], []
    with urllib.request.urlopen(req, timeout=120) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                out["errors"].append(event["error"])
                continue
            choice = event["choices"][0]
            out["pieces"].append(choice.get("text", ""))
            out["finish"] = choice.get("finish_reason") or out.get("finish")


@pytest.mark.timeout(180)
def test_tensor_model_serves_while_the_llm_reloads_and_the_stream_continues(ferry):
    d = ferry
    # an engine that has served STABLE_S restarts at once (the schedule's first step, 0)
    wait_until(lambda: _digits_ok(d.url), 30, "digits to serve")
    time.sleep(STABLE_S)    # the condition is the engine's age itself; nothing to poll
    out: dict = {}
    streamer = threading.Thread(target=_stream, args=(d.url, out))
    streamer.start()
    wait_until(lambda: len(out.get("pieces", [])) >= 4, 60, "the stream to start", interval=0.01)
    (engine,) = d.child_pids("engine")
    killed = time.monotonic()
    os.kill(engine, signal.SIGKILL)
    wait_until(lambda: http_get(d.url + "/readyz")[0] == 503, 10, "readyz to see the death",
               interval=0.01)
    wait_until(lambda: _digits_ok(d.url), 30, "digits to serve again", interval=0.01)
    tensor_back = time.monotonic() - killed
    status, body = http_get(d.url + "/readyz")
    # the LLM takes seconds to load; the tensor model did not wait for it
    assert status == 503 and body["status"] == "degraded", (tensor_back, body)
    wait_until(lambda: http_get(d.url + "/readyz")[0] == 200, 90, "the daemon to be ready")
    ready_back = time.monotonic() - killed
    streamer.join(90)
    assert not streamer.is_alive()
    assert out["errors"] == [] and out.get("finish") == "length", out
    assert len("".join(out["pieces"])) > 0
    log = d.log()
    assert "restarting in 0.00 s" in log, log[-3000:]
    assert "continuing stream" in log
    back = [json.loads(line) for line in log.splitlines()
            if line.startswith("{") and "is back (generation" in line]
    assert back and "digits:1" in back[-1]["msg"] and "smollm2:1" in back[-1]["msg"], back
    assert back[-1]["announced_s"] < back[-1]["recovery_s"], back
    print(f"\ntensor served {tensor_back:.2f} s, ready {ready_back:.2f} s after the kill")


@pytest.mark.timeout(240)
def test_a_standby_engine_takes_over_and_is_replaced(demo_models, tmp_path_factory):
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, ("digits", "smollm2")), workers=1,
               env={"FERRY_TORCH_THREADS": "1"},
               extra_config="[engines]\nstandby = \"models\"\n").start(timeout_s=240)
    try:
        wait_until(lambda: "standby engine for cpu ready" in d.log(), 120, "the standby")
        (standby,) = d.child_pids("standby")
        (engine,) = d.child_pids("engine")
        time.sleep(STABLE_S)    # the condition is the engine's age itself; nothing to poll
        killed = time.monotonic()
        os.kill(engine, signal.SIGKILL)
        # the waiting process becomes the engine (and says so in its command line)
        wait_until(lambda: d.child_pids("engine") == [standby], 30, "the standby to take over")
        wait_until(lambda: _digits_ok(d.url), 30, "digits to serve again", interval=0.01)
        tensor_back = time.monotonic() - killed
        wait_until(lambda: http_get(d.url + "/readyz")[0] == 200, 90, "the daemon to be ready")
        ready_back = time.monotonic() - killed
        assert "takes over engine-cpu" in d.log()
        # standby = "models": the LLM loaded by the standby is adopted, not loaded again
        assert "adopted smollm2 v1, loaded by the standby" in d.log()
        # a new standby is started once the engine is back
        wait_until(lambda: len(d.child_pids("standby")) == 1
                   and d.child_pids("standby") != [standby], 30, "a new standby")
        print(f"\nwith a standby: tensor served {tensor_back:.2f} s, ready {ready_back:.2f} s")
    finally:
        code = d.stop()
    assert code == 0, d.log()[-3000:]
    assert not d.child_pids("")
