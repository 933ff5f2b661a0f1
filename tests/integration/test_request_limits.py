"""Limits that bound one request's cost, against a real daemon serving SmolLM2:
`server.request_timeout_s` ends generations on every path (the engine's KV blocks freed), and a
prompt too large for the context is refused before it is tokenized."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import aiohttp
import pytest

from frontends.client import AsyncFerryClient, FerryClient
from daemon.errors import FerryError
from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon, orphan_segments, request_json, wait_until

pytestmark = pytest.mark.timeout(240)

TIMEOUT_S = 2.0
# Far more tokens than a 135M model makes in TIMEOUT_S on a CPU (tens per second).
LONG = {"model": "smollm2", "max_tokens": 1500, "ignore_eos": True, "temperature": 0}
ENGINE_PARAMS = {k: v for k, v in LONG.items() if k != "model"}
CHAT = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, names=("smollm2",)), workers=1,
               server_extra=f"request_timeout_s = {TIMEOUT_S}",
               env={"FERRY_TORCH_THREADS": "1"}).start()
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def llm_stats(ferry) -> dict:
    with FerryClient(ferry.zmq_endpoint, timeout_s=10) as c:
        engines = c.stats()["engines"]
    return next(e["models"]["smollm2:1"] for e in engines if "smollm2:1" in e["models"])


def assert_engine_idle(ferry) -> None:
    wait_until(lambda: (s := llm_stats(ferry))["running"] == 0 and s["kv_blocks_used"] == 0,
               5, "the engine to drop the expired generation and free its KV blocks")


def post(ferry, path: str, body: dict, timeout: float = 60) -> urllib.request.Request:
    return urllib.request.Request(ferry.url + path, data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})


# -- request_timeout_s --------------------------------------------------------------------------

def test_non_streamed_generation_ends_with_504_at_the_timeout(ferry):
    started = time.monotonic()
    status, body = request_json(post(ferry, "/v1/chat/completions",
                                     {**LONG, "messages": CHAT}), timeout=60)
    elapsed = time.monotonic() - started
    assert status == 504, body
    assert body["error"]["code"] == "deadline_exceeded"
    assert elapsed < TIMEOUT_S + 5
    assert_engine_idle(ferry)


def test_streamed_generation_ends_with_an_error_event_at_the_timeout(ferry):
    started = time.monotonic()
    req = post(ferry, "/v1/chat/completions", {**LONG, "messages": CHAT, "stream": True, "n": 4})
    events = []
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
        for line in resp:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                events.append(json.loads(line[6:]))
    elapsed = time.monotonic() - started
    assert elapsed < TIMEOUT_S + 5
    assert any(e.get("choices") for e in events), "tokens streamed before the deadline"
    assert events[-1]["error"]["code"] == "deadline_exceeded", events[-1]
    assert_engine_idle(ferry)


def test_websocket_generation_ends_with_an_error_message_at_the_timeout(ferry):
    async def go() -> dict:
        async with aiohttp.ClientSession() as s, s.ws_connect(ferry.url + "/v1/ws") as ws:
            await ws.send_json({"type": "inference", "id": "w", "prompt": "Once upon a time",
                                **LONG})
            while True:
                msg = json.loads((await ws.receive(timeout=60)).data)
                if msg["type"] in ("error", "complete"):
                    return msg

    started = time.monotonic()
    msg = asyncio.run(go())
    assert time.monotonic() - started < TIMEOUT_S + 5
    assert msg["type"] == "error" and msg["code"] == "deadline_exceeded", msg
    assert_engine_idle(ferry)


def test_zmq_generation_ends_with_an_error_at_the_timeout(ferry):
    async def go() -> FerryError:
        client = AsyncFerryClient(ferry.zmq_endpoint, timeout_s=60)
        try:
            with pytest.raises(FerryError) as caught:
                async for _ in client.generate("smollm2", [1, 2, 3, 4], ENGINE_PARAMS):
                    pass
            return caught.value
        finally:
            await client.close()

    started = time.monotonic()
    exc = asyncio.run(go())
    assert time.monotonic() - started < TIMEOUT_S + 5
    assert exc.code == "deadline_exceeded", exc
    assert_engine_idle(ferry)


# -- prompts too large for the context ------------------------------------------------------------

HUGE = "hello world " * ((8 << 20) // 12)         # ~8 MB: far more than any context holds

WS_HUGE = "hello world " * 80_000                # under the WebSocket's 1 MiB message limit


def rss_mb(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(next(l.split()[1] for l in status.splitlines() if l.startswith("VmRSS:"))) / 1024


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": HUGE}]}, "messages"),
    ("/v1/completions", {"prompt": HUGE}, "prompt"),
])
def test_a_huge_prompt_is_refused_before_it_is_tokenized(ferry, path, body, param):
    [worker] = ferry.child_pids("http")
    before = rss_mb(worker)
    started = time.monotonic()
    status, reply = request_json(post(ferry, path, {"model": "smollm2", "max_tokens": 4,
                                                    **body}), timeout=60)
    elapsed = time.monotonic() - started
    assert status == 400, reply
    assert reply["error"]["code"] == "context_length_exceeded"
    assert reply["error"]["param"] == param
    # Tokenizing 8 MB takes tens of seconds here and leaves the worker gigabytes larger.
    assert elapsed < 5, elapsed
    assert rss_mb(worker) - before < 100, (before, rss_mb(worker))


def test_a_huge_websocket_prompt_is_refused_before_it_is_tokenized(ferry):
    async def go() -> dict:
        async with aiohttp.ClientSession() as s, \
                s.ws_connect(ferry.url + "/v1/ws", max_msg_size=0) as ws:
            await ws.send_json({"type": "inference", "id": "h", "model": "smollm2",
                                "prompt": WS_HUGE, "max_tokens": 4})
            return json.loads((await ws.receive(timeout=30)).data)

    started = time.monotonic()
    msg = asyncio.run(go())
    assert msg["type"] == "error" and msg["code"] == "context_length_exceeded", msg
    assert time.monotonic() - started < 2.5      # tokenizing it takes about twice that
