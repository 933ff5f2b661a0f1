"""Seed 004 (Inferno, ../shared/seeds/004-inferno-api.md): its documented examples, sent as
written (the model name aside: `llama-2-7b` is not in the demo repository, which the
documented MODEL_NOT_FOUND error shows), against a real daemon with auth required; the
documented response fields, error body, rate-limit headers, SSE and WebSocket messages."""
from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import urllib.request

import aiohttp
import pytest

from tests.integration.compat_client import stop_cleanly
from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import wait_until
from tests.integration.secure_daemon import SecureDaemon, call

pytestmark = pytest.mark.timeout(240)

MODEL = "smollm2"


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = SecureDaemon(tensor_repo(demo_models, tmp_path_factory, ("smollm2", "minilm", "digits")),
                     workers=1, extra_config="[auth]\nrequired = true\n"
                     "[repository]\ncontrol_mode = \"explicit\"\n",
                     env={"FERRY_TORCH_THREADS": "1"})

    async def seed(state):
        infer = await state.keys.create("inferno", scopes=["infer"])
        admin = await state.keys.create("inferno-admin", scopes=["admin", "infer"])
        limited = await state.keys.create("inferno-limited", scopes=["infer"], rpm=2)
        return {"infer": infer.plaintext, "admin": admin.plaintext,
                "limited": limited.plaintext}

    d.creds = d.state(seed)
    d.start()
    yield d
    stop_cleanly(d)


def _inferno_error(body, code: str) -> None:
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)
    assert isinstance(body["request_id"], str) and body["timestamp"].endswith("Z")


def test_health_example(ferry):
    # curl http://localhost:8080/health: Ferry's own /health stays vLLM's probe at the root
    # ([compat] root = ""); Inferno's body is under its prefix.
    status, _, body = call(ferry, "GET", "/health")
    assert status == 200 and body is None
    status, _, body = call(ferry, "GET", "/compat/inferno/health")
    assert status == 200, body
    assert body["status"] == "healthy" and isinstance(body["version"], str)
    assert isinstance(body["uptime_seconds"], int) and body["models_loaded"] == 3


def test_list_models_example(ferry):
    status, _, body = call(ferry, "GET", "/models",
                           headers={"Authorization": f"Bearer {ferry.creds['infer']}"})
    assert status == 200, body
    by_id = {m["id"]: m for m in body["models"]}
    assert set(by_id) == {"smollm2", "minilm", "digits"}
    llm = by_id["smollm2"]
    assert llm["loaded"] is True and llm["type"] == "llm" and llm["size_bytes"] > 1_000_000
    _, _, cards = call(ferry, "GET", "/v1/models", key=ferry.creds["infer"])
    context = next(c["max_model_len"] for c in cards["data"] if c["id"] == MODEL)
    assert llm["context_size"] == context and "text-generation" in llm["capabilities"]
    assert {"id", "name", "type", "size_bytes", "loaded", "context_size",
            "capabilities"} <= set(by_id["digits"])


def test_unknown_model_is_the_documented_error(ferry):
    doc = {"model": "llama-2-7b", "prompt": "What is the capital of France?",
           "max_tokens": 100, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
           "repeat_penalty": 1.1, "stop": ["\n", "###"], "stream": False}
    status, headers, body = call(ferry, "POST", "/inference", key=ferry.creds["infer"], body=doc)
    assert status == 404, body
    _inferno_error(body, "MODEL_NOT_FOUND")
    assert body["error"]["details"]["available_models"] == ["digits", "minilm", "smollm2"]
    assert headers["X-Request-ID"] == body["request_id"]


def test_inference_example(ferry):
    doc = {"model": MODEL, "prompt": "What is the capital of France?", "max_tokens": 100,
           "temperature": 0.7, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1,
           "stop": ["\n", "###"], "stream": False}
    status, _, body = call(ferry, "POST", "/inference", key=ferry.creds["infer"], body=doc)
    assert status == 200, body
    assert body["id"].startswith("inf_") and body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    assert "\n" not in choice["text"] and "###" not in choice["text"]
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 100
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert abs(body["created"] - time.time()) < 600 and body["processing_time_ms"] >= 0


def test_curl_inference_example(ferry):
    status, _, body = call(ferry, "POST", "/inference", key=ferry.creds["infer"], body={
        "model": MODEL, "prompt": "Hello, how are you?", "max_tokens": 50})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] <= 50


def _sse(ferry, path: str, body: dict) -> tuple[int, str, list[dict]]:
    req = urllib.request.Request(
        ferry.url + path, data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {ferry.creds['infer']}",
                 "Content-Type": "application/json", "Accept": "text/event-stream"})
    with urllib.request.urlopen(req, timeout=180) as resp:
        raw = resp.read().decode()
        ctype = resp.headers["Content-Type"]
    events = [json.loads(line[len("data: "):]) for line in raw.split("\n\n") if line]
    return resp.status, ctype, events


def test_stream_example(ferry):
    status, ctype, events = _sse(ferry, "/inference/stream", {
        "model": MODEL, "prompt": "Tell me a joke", "max_tokens": 100, "stream": True})
    assert status == 200 and ctype.startswith("text/event-stream")
    tokens, last = events[:-1], events[-1]
    assert last == {"done": True, "finish_reason": last["finish_reason"]}
    assert last["finish_reason"] in ("stop", "length")
    assert [t["index"] for t in tokens] == list(range(len(tokens))) and tokens
    assert all(isinstance(t["token"], str) and t["token"] for t in tokens)


def test_stream_through_inference_with_stream_true(ferry):
    status, ctype, events = _sse(ferry, "/inference", {
        "model": MODEL, "prompt": "Explain quantum physics", "max_tokens": 5, "stream": True})
    assert status == 200 and ctype.startswith("text/event-stream")
    assert events[-1]["done"] is True and len(events) <= 6


def test_embeddings_example(ferry):
    status, _, body = call(ferry, "POST", "/embeddings", key=ferry.creds["infer"], body={
        "model": "minilm", "input": ["Hello world", "How are you?"],
        "encoding_format": "float"})
    assert status == 200, body
    assert body["model"] == "minilm" and [d["index"] for d in body["data"]] == [0, 1]
    assert all(len(d["embedding"]) == 384 for d in body["data"])
    assert body["data"][0]["embedding"] != body["data"][1]["embedding"]
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["total_tokens"] > 0
    # the tokens are charged to the key and logged as on /v1/embeddings
    def logged() -> list:
        with sqlite3.connect(ferry.state_dir / "ferry.db") as db:
            return db.execute("SELECT prompt_tokens FROM request_log WHERE route = "
                              "'POST /embeddings' AND status = 200").fetchall()
    wait_until(lambda: logged(), 10, "the request log row")
    assert logged()[-1][0] == body["usage"]["prompt_tokens"]


def test_batch_example(ferry):
    doc = {"model": MODEL, "requests": [{"id": "req1", "prompt": "What is AI?"},
                                        {"id": "req2", "prompt": "Explain quantum computing"}],
           "max_tokens": 100, "webhook_url": "https://example.com/webhook"}
    status, _, body = call(ferry, "POST", "/batch", key=ferry.creds["infer"], body=doc)
    if status == 400:       # example.com does not resolve here: the egress check says so
        assert body["error"]["details"]["ferry_code"].startswith("webhook_url"), body
        del doc["webhook_url"]
        doc["max_tokens"] = 4
        status, _, body = call(ferry, "POST", "/batch", key=ferry.creds["infer"], body=doc)
    assert status == 200, body
    assert body["status"] == "processing" and body["total_requests"] == 2
    assert isinstance(body["batch_id"], str) and body["created"] > 0
    batch_id = body["batch_id"]

    def done():
        s, _, b = call(ferry, "GET", f"/batch/{batch_id}", key=ferry.creds["infer"])
        assert s == 200, b
        return b if b["status"] == "completed" else None
    final = wait_until(done, 200, "the batch to complete", interval=0.5)
    assert final == {"batch_id": batch_id, "status": "completed", "completed": 2, "failed": 0,
                     "total": 2, "results_url": f"/batch/{batch_id}/results"}
    s, _, results = call(ferry, "GET", final["results_url"], key=ferry.creds["infer"])
    assert s == 200, results
    assert sorted(r["custom_id"] for r in results["data"]) == ["req1", "req2"]
    # another key cannot see it
    s, _, b = call(ferry, "GET", f"/batch/{batch_id}", key=ferry.creds["admin"])
    assert s == 200       # admin sees every job
    s, _, b = call(ferry, "GET", "/batch/nope", key=ferry.creds["infer"])
    assert s == 404 and b["error"]["code"] == "INVALID_REQUEST", b


def test_load_and_unload(ferry):
    key = ferry.creds["admin"]
    status, _, body = call(ferry, "POST", "/models/digits/unload", key=key)
    assert status == 200 and body == {"status": "unloaded", "model_id": "digits"}, body
    status, _, body = call(ferry, "POST", "/models/digits/load", key=key,
                           body={"gpu_layers": 32, "context_size": 2048, "batch_size": 512})
    assert status == 200, body
    assert body["status"] == "loaded" and body["model_id"] == "digits"
    assert body["memory_usage_bytes"] > 0 and body["load_time_ms"] >= 0
    # the admin scope, as Ferry's /v2/repository routes
    status, _, body = call(ferry, "POST", "/models/digits/unload", key=ferry.creds["infer"])
    assert status == 403, body
    _inferno_error(body, "AUTHORIZATION_FAILED")
    status, _, body = call(ferry, "POST", "/models/digits/load", key=key,
                           body={"gpu_layers": -1})
    assert status == 400, body
    _inferno_error(body, "INVALID_REQUEST")


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL}, "prompt"),
    ({"prompt": "x"}, "model"),
    ({"model": MODEL, "prompt": "x", "temperature": 5}, "temperature"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**6}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "bogus": 1}, "bogus"),
])
def test_bad_inference_bodies(ferry, body, param):
    status, _, answer = call(ferry, "POST", "/inference", key=ferry.creds["infer"], body=body)
    assert status == 400, answer
    _inferno_error(answer, "CONTEXT_LENGTH_EXCEEDED" if body.get("max_tokens") == 10**6
                   else "INVALID_REQUEST")
    assert answer["error"]["details"].get("param") == param


def test_malformed_json_and_bad_batch(ferry):
    status, _, body = call(ferry, "POST", "/inference", key=ferry.creds["infer"],
                           raw=b"{nope", headers={"Content-Type": "application/json"})
    assert status == 400
    _inferno_error(body, "INVALID_REQUEST")
    for bad in ({"model": MODEL}, {"model": MODEL, "requests": [{"id": "a"}]},
                {"model": MODEL, "requests": [{"prompt": "x"}], "webhook_url": 5}):
        status, _, body = call(ferry, "POST", "/batch", key=ferry.creds["infer"], body=bad)
        assert status == 400, body
        _inferno_error(body, "INVALID_REQUEST")


def test_authentication_and_rate_limits(ferry):
    status, _, body = call(ferry, "POST", "/inference",
                           body={"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert status == 401
    _inferno_error(body, "AUTHENTICATION_FAILED")
    status, _, body = call(ferry, "GET", "/models", key="fy_0123456789ab_" + "A" * 43)
    assert status == 401
    _inferno_error(body, "AUTHENTICATION_FAILED")
    key = ferry.creds["limited"]
    seen = []
    for _ in range(3):
        status, headers, body = call(ferry, "GET", "/models", key=key)
        seen.append(status)
        assert headers["X-RateLimit-Limit"] == "2" and "X-RateLimit-Reset" in headers
    assert seen == [200, 200, 429]
    _inferno_error(body, "RATE_LIMIT_EXCEEDED")
    assert body["error"]["retry_after"] >= 1 and headers["X-RateLimit-Remaining"] == "0"
    assert int(headers["Retry-After"]) >= 1


async def _ws_session(ferry) -> list[dict]:
    got = []
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(ferry.url.replace("http", "ws") + "/ws") as ws:
            await ws.send_json({"type": "auth", "token": ferry.creds["infer"]})
            await ws.send_json({"type": "inference", "id": "req_123", "model": MODEL,
                                "prompt": "Tell me a story", "max_tokens": 200,
                                "stream": True})
            await ws.send_json({"type": "ping"})
            while True:
                msg = json.loads((await ws.receive(timeout=150)).data)
                got.append(msg)
                if msg["type"] in ("complete", "error"):
                    break
            await ws.send_json({"type": "inference", "id": "r2", "model": MODEL,
                                "prompt": "Once upon a time", "max_tokens": 300,
                                "ignore_eos": True, "stream": True})
            await ws.send_json({"type": "cancel", "id": "r2"})
            while True:
                msg = json.loads((await ws.receive(timeout=150)).data)
                got.append(msg)
                if msg["type"] in ("complete", "error") and msg.get("id") == "r2":
                    break
    return got


def test_websocket_protocol(ferry):
    got = asyncio.run(asyncio.wait_for(_ws_session(ferry), 200))
    types = [m["type"] for m in got]
    assert "auth" in types and "pong" in types, types
    tokens = [m for m in got if m["type"] == "token" and m["id"] == "req_123"]
    assert tokens and all(isinstance(m["token"], str) for m in tokens)
    assert [m["index"] for m in tokens] == list(range(len(tokens)))
    done = next(m for m in got if m["type"] == "complete" and m["id"] == "req_123")
    assert done["text"] == "".join(m["token"] for m in tokens)
    cancelled = got[-1]
    assert cancelled["type"] == "complete" and cancelled["finish_reason"] == "cancelled"


def test_websocket_refuses_a_bad_token(ferry):
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(ferry.url.replace("http", "ws") + "/ws") as ws:
                await ws.send_json({"type": "auth", "token": "nope"})
                return json.loads((await ws.receive(timeout=30)).data)
    msg = asyncio.run(asyncio.wait_for(go(), 60))
    assert msg["type"] == "error" and msg["status"] == 401, msg


def test_prefix_serves_the_same_routes(ferry):
    status, _, body = call(ferry, "GET", "/compat/inferno/models", key=ferry.creds["infer"])
    assert status == 200 and {m["id"] for m in body["models"]} == {"smollm2", "minilm", "digits"}
