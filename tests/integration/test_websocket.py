"""WebSocket /v1/ws with an aiohttp client against a real daemon serving SmolLM2: requests
multiplexed on one socket, cancel, ping, bad messages, and a closed socket freeing the engine."""
from __future__ import annotations

import asyncio
import json
import urllib.request

import aiohttp
import pytest

from frontends.client import FerryClient
from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon, orphan_segments, wait_until

pytestmark = pytest.mark.timeout(180)

PROMPT = "Once upon a time"
A = {"type": "inference", "id": "a", "model": "smollm2", "prompt": PROMPT, "max_tokens": 8,
     "temperature": 0, "ignore_eos": True}
B = {"type": "inference", "id": 7, "model": "smollm2",
     "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400,
     "ignore_eos": True}


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    # One torch thread: see ENV in test_openai.py.
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, names=("smollm2",)),
               env={"FERRY_TORCH_THREADS": "1"}).start()
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def recv(ws) -> dict:
    msg = await ws.receive(timeout=60)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


def llm_stats(ferry) -> dict:
    with FerryClient(ferry.zmq_endpoint, timeout_s=10) as c:
        engines = c.stats()["engines"]
    return next(e["models"]["smollm2:1"] for e in engines if "smollm2:1" in e["models"])


def http_completion(ferry) -> str:
    body = {k: A[k] for k in ("model", "prompt", "max_tokens", "temperature", "ignore_eos")}
    req = urllib.request.Request(ferry.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())["choices"][0]["text"]


def test_interleaved_requests_and_a_cancel(ferry):
    expected_a = http_completion(ferry)

    async def scenario() -> tuple[list[dict], list[dict]]:
        async with aiohttp.ClientSession() as s, s.ws_connect(ferry.url + "/v1/ws") as ws:
            await ws.send_json({"type": "auth", "token": "anything"})
            assert await recv(ws) == {"type": "auth", "ok": True}
            await ws.send_json(B)
            await ws.send_json(A)
            log, done = [], []
            while len(done) < 2:
                m = await recv(ws)
                log.append(m)
                if m["type"] == "complete":
                    done.append(m)
                elif m["type"] == "token" and m["id"] == "a" and m["index"] == 2:
                    await ws.send_json({"type": "cancel", "id": 7})
            return log, done

    log, done = run(scenario())
    a = next(m for m in done if m["id"] == "a")
    b = next(m for m in done if m["id"] == 7)
    a_tokens = [m for m in log if m["type"] == "token" and m["id"] == "a"]
    b_tokens = [m for m in log if m["type"] == "token" and m["id"] == 7]
    assert a["finish_reason"] == "length" and a["usage"]["completion_tokens"] == A["max_tokens"]
    assert a["text"] == "".join(m["token"] for m in a_tokens) == expected_a
    assert [m["index"] for m in a_tokens] == list(range(len(a_tokens)))
    assert b["finish_reason"] == "cancelled" and b["text"] == "".join(m["token"]
                                                                        for m in b_tokens)
    # The two streams shared the socket at the same time: B's tokens came between A's.
    first_a, last_a = log.index(a_tokens[0]), log.index(a_tokens[-1])
    assert any(first_a < log.index(m) < last_a for m in b_tokens)
    wait_until(lambda: llm_stats(ferry)["kv_blocks_used"] == 0, 5, "B's KV blocks freed")


def test_ping_non_streamed_and_bad_messages_keep_the_socket_open(ferry):
    async def scenario() -> list[dict]:
        async with aiohttp.ClientSession() as s, s.ws_connect(ferry.url + "/v1/ws") as ws:
            out = []
            for raw in ['{"type": "ping", "seq": 3}', "not json", '{"type": "dance"}',
                        '{"type": "inference", "model": "smollm2", "prompt": "x"}',
                        '{"type": "inference", "id": "m", "model": "nope", "prompt": "x"}',
                        '{"type": "inference", "id": "n", "model": "smollm2", "n": 99, '
                        '"prompt": "x"}',
                        '{"type": "cancel", "id": "ghost"}']:
                await ws.send_str(raw)
                out.append(await recv(ws))
            await ws.send_bytes(b"\x00")
            out.append(await recv(ws))
            await ws.send_json({**A, "id": "w", "stream": False, "max_tokens": 3})
            out.append(await recv(ws))
            return out

    pong, bad_json, bad_type, no_id, unknown, too_many, ghost, binary, whole = run(scenario())
    assert pong == {"type": "pong", "seq": 3}
    assert (bad_json["type"], bad_json["code"], bad_json["id"]) == ("error", "invalid_json",
                                                                    None)
    assert (bad_type["code"], bad_type["param"]) == ("unknown_type", "type")
    assert (no_id["code"], no_id["param"]) == ("invalid_parameter", "id")
    assert (unknown["id"], unknown["code"], unknown["status"]) == ("m", "model_not_found", 404)
    assert (too_many["id"], too_many["code"], too_many["param"]) == ("n", "invalid_parameter",
                                                                     "n")
    assert (ghost["code"], ghost["status"]) == ("unknown_request", 404)
    assert binary["code"] == "invalid_json"
    assert whole["type"] == "complete" and whole["id"] == "w"
    assert whole["finish_reason"] == "length" and whole["usage"]["completion_tokens"] == 3


def test_duplicate_id_is_refused(ferry):
    async def scenario() -> tuple[dict, dict]:
        async with aiohttp.ClientSession() as s, s.ws_connect(ferry.url + "/v1/ws") as ws:
            await ws.send_json({**A, "id": "d", "stream": False})
            await ws.send_json({**A, "id": "d", "stream": False})
            first, second = await recv(ws), await recv(ws)
            return first, second

    first, second = run(scenario())
    assert first["type"] == "error" and first["code"] == "duplicate_id"
    assert second["type"] == "complete" and second["id"] == "d"


def test_closing_the_socket_frees_the_engine(ferry):
    before = llm_stats(ferry)["tokens_generated"]

    async def scenario() -> None:
        async with aiohttp.ClientSession() as s, s.ws_connect(ferry.url + "/v1/ws") as ws:
            await ws.send_json(B)
            for _ in range(2):
                assert (await recv(ws))["type"] == "token"
        # leaving the block closes the socket with B still generating

    run(scenario())
    stats = wait_until(lambda: (s := llm_stats(ferry))["running"] == 0
                       and s["kv_blocks_used"] == 0 and s, 5, "the KV blocks to be freed")
    assert stats["tokens_generated"] - before < B["max_tokens"]
