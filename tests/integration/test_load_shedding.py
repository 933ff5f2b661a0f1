"""Load shedding on a real daemon with the demo LLM: `[server] max_waiting` and
`max_queue_wait_s` refuse a generation with 429 `overloaded` (Retry-After) on every path before
the engine sees it, and admit again once the queue drains."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import aiohttp
import pytest

from daemon.errors import FerryError, RateLimited
from frontends.client import AsyncFerryClient
from tests.integration.daemon_proc import Daemon, wait_until
from tests.integration.test_vllm_metrics import (MAX_NUM_SEQS, Streams, body, idle, llm_repo,
                                                 scrape, value)

pytestmark = pytest.mark.timeout(120)

MAX_WAITING = 2
MAX_QUEUE_WAIT_S = 6.0         # room for a loaded host to queue the streams first
HOLD_TOKENS = 2500          # far longer than a test waits, even decoding int4 on a fast CPU:
                            # the streams stay in flight (they are cancelled on close)


@pytest.fixture(scope="module")
def shed(demo_models, tmp_path_factory):
    d = Daemon(llm_repo(tmp_path_factory.mktemp("repo"), kv_cache_mb=512), workers=1,
               server_extra=f"max_waiting = {MAX_WAITING}\nmax_queue_wait_s = {MAX_QUEUE_WAIT_S}",
               env={"FERRY_TORCH_THREADS": "1"}).start(timeout_s=180)
    yield d
    assert d.stop() == 0, d.log()[-4000:]


def waiting(d: Daemon) -> float:
    return value(scrape(d), "vllm:num_requests_waiting")


def accepted(d: Daemon) -> float:
    return value(scrape(d), "ferry_engine_requests", "ferry_engine_requests_total")


async def until(cond, what: str, timeout_s: float = 20.0) -> None:
    await asyncio.to_thread(wait_until, cond, timeout_s, what)


async def http(d: Daemon, path: str, payload: dict) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(d.url + path, json=payload) as r:
            return r.status, dict(r.headers), json.loads(await r.read())


async def websocket(d: Daemon) -> dict:
    async with aiohttp.ClientSession() as s, s.ws_connect(d.url + "/v1/ws") as ws:
        await ws.send_json({"type": "inference", "id": "w", "prompt": "Hello",
                            "model": "smollm2", "max_tokens": 4})
        while True:
            msg = json.loads((await ws.receive(timeout=30)).data)
            if msg["type"] in ("error", "complete"):
                return msg


async def zmq(d: Daemon) -> FerryError | None:
    client = AsyncFerryClient(d.zmq_endpoint, timeout_s=30)
    try:
        async for _ in client.generate("smollm2", [1, 2, 3, 4], {"max_tokens": 2}):
            pass
    except FerryError as exc:
        return exc
    finally:
        await client.close()
    return None


def assert_overloaded(status: int, headers: dict, payload: dict, why: str) -> None:
    assert status == 429, payload
    assert payload["error"]["code"] == "overloaded", payload
    assert why in payload["error"]["message"], payload
    assert int(headers["Retry-After"]) >= 1


def test_a_full_queue_refuses_every_path_before_the_engine_sees_it(shed):
    async def run() -> None:
        # two running and two waiting: one more would make three wait
        async with Streams(shed.url, MAX_NUM_SEQS + MAX_WAITING, max_tokens=HOLD_TOKENS):
            await until(lambda: waiting(shed) == MAX_WAITING, "a full queue")
            before = accepted(shed)
            assert_overloaded(*await http(shed, "/v1/completions", body("Hi", 4)), "is full")
            # a stream is refused with a status, not with an error event after a 200
            assert_overloaded(*await http(shed, "/v1/chat/completions", {
                "model": "smollm2", "max_tokens": 4, "stream": True,
                "messages": [{"role": "user", "content": "Hi"}]}), "is full")
            # decided before the prompt is even looked at: a prompt far over the context, which
            # an idle daemon refuses with 400 before tokenizing it, gets the 429 here
            assert_overloaded(*await http(shed, "/v1/completions",
                                          body("hello " * 200_000, 4)), "is full")
            msg = await websocket(shed)
            assert msg["type"] == "error" and msg["code"] == "overloaded", msg
            exc = await zmq(shed)
            assert exc is not None and exc.code == "overloaded" and exc.status == 429, exc
            # ZMQ clients get the same retry hint HTTP's Retry-After carries
            assert isinstance(exc, RateLimited) and exc.retry_after >= 1, exc
            assert accepted(shed) == before            # the engine never got them
            assert waiting(shed) == MAX_WAITING
        # the streams closed: the queue drains and generations are admitted again
        await until(lambda: idle(shed), "an idle engine")
        status, _, payload = await http(shed, "/v1/completions", body("Hi", 4))
        assert status == 200 and payload["usage"]["completion_tokens"] == 4
        status, _, payload = await http(shed, "/v1/completions", body("hello " * 200_000, 4))
        assert status == 400 and payload["error"]["code"] == "context_length_exceeded", payload
    asyncio.run(run())


def test_a_queue_whose_head_waited_too_long_refuses_new_work(shed):
    async def run() -> None:
        async with Streams(shed.url, MAX_NUM_SEQS + 1, max_tokens=HOLD_TOKENS):
            queued_at = time.monotonic()
            await until(lambda: waiting(shed) == 1, "one queued request")
            # within the wait limit and under max_waiting: admitted (it queues)
            assert time.monotonic() - queued_at < MAX_QUEUE_WAIT_S - 1
            async with Streams(shed.url, 1, max_tokens=4):
                await until(lambda: waiting(shed) == 2, "the second queued request")
            await until(lambda: waiting(shed) == 1, "the cancelled one to leave")
            await until(lambda: time.monotonic() - queued_at > MAX_QUEUE_WAIT_S + 0.2,
                        "the queued request to pass the wait limit")
            assert_overloaded(*await http(shed, "/v1/completions", body("Hi", 4)),
                              "have waited")
            assert waiting(shed) == 1
    asyncio.run(run())
    wait_until(lambda: idle(shed), 30, "an idle engine")


def test_batch_items_wait_for_room_instead_of_failing(shed):
    async def call(method: str, path: str, payload: dict | None = None) -> tuple[int, dict]:
        async with aiohttp.ClientSession() as s:
            async with s.request(method, shed.url + path, json=payload) as r:
                return r.status, await r.json(content_type=None)

    async def run() -> list[dict]:
        async with Streams(shed.url, MAX_NUM_SEQS + MAX_WAITING, max_tokens=HOLD_TOKENS):
            await until(lambda: waiting(shed) == MAX_WAITING, "a full queue")
            status, job = await call("POST", "/v1/batches", {
                "endpoint": "/v1/completions",
                "requests": [{"model": "smollm2", "prompt": f"Item {i}", "max_tokens": 2,
                              "ignore_eos": True} for i in range(2)]})
            assert status == 201, job
            status, seen = await call("GET", f"/v1/batches/{job['id']}")
            assert seen["ferry_status"] != "completed", seen
            assert waiting(shed) == MAX_WAITING          # the items did not join the queue
        # room again: the items run
        deadline = time.monotonic() + 40
        while True:
            status, seen = await call("GET", f"/v1/batches/{job['id']}")
            if seen["ferry_status"] == "completed":
                break
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as s:
            async with s.get(shed.url + f"/v1/batches/{job['id']}/results?format=jsonl") as r:
                return [json.loads(line) for line in (await r.text()).splitlines()]
    rows = asyncio.run(run())
    assert len(rows) == 2
    for row in rows:
        assert row["error"] is None and row["response"]["status_code"] == 200, row
        assert row["response"]["body"]["usage"]["completion_tokens"] == 2


def test_reload_applies_new_limits_without_a_restart(shed):
    def reload(server_extra: str) -> None:
        shed.server_extra = server_extra
        shed.write_config()
        os.kill(shed.proc.pid, signal.SIGHUP)

    async def run() -> None:
        async with Streams(shed.url, MAX_NUM_SEQS + MAX_WAITING, max_tokens=HOLD_TOKENS):
            await until(lambda: waiting(shed) == MAX_WAITING, "a full queue")
            assert (await http(shed, "/v1/completions", body("Hi", 4)))[0] == 429
            reload(f"max_waiting = {MAX_WAITING + 1}\nmax_queue_wait_s = 0")
            # one more may wait now: a stream is admitted into the queue (and then closed)
            deadline = time.monotonic() + 20
            while True:
                async with aiohttp.ClientSession() as s:
                    async with s.post(shed.url + "/v1/completions",
                                      json=body("Hi", 4, stream=True)) as r:
                        if r.status == 200:
                            break
                assert time.monotonic() < deadline, "the reload never applied"
                await asyncio.sleep(0.1)
    try:
        asyncio.run(run())
    finally:
        reload(f"max_waiting = {MAX_WAITING}\nmax_queue_wait_s = {MAX_QUEUE_WAIT_S}")
    wait_until(lambda: idle(shed), 30, "an idle engine")
    assert "max_waiting changed; it applies at the next restart" not in shed.log()
