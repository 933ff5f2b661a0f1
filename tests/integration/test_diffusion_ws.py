"""Image generation over the WebSocket API (/v1/ws) against a real daemon serving a tiny random
Stable Diffusion directory: `inference` naming an image model streams a `progress` event per
image per denoising step as the engine takes it, then `complete` with the PNGs (the same bytes
as /v1/images/generations for the same seed); `cancel` and closing the socket free the rows in
the engine; every bad field is an `error` event naming it, and the socket stays usable."""
from __future__ import annotations

import asyncio
import base64
import json
import re
import urllib.request

import aiohttp
import pytest

from tests.integration.daemon_proc import request_json, wait_until

pytest.importorskip("diffusers")
pytestmark = pytest.mark.timeout(180)

@pytest.fixture(scope="module")
def ferry(tiny_sd_daemon):
    return tiny_sd_daemon


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 150))


async def recv(ws) -> dict:
    msg = await ws.receive(timeout=60)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def until_terminal(ws, rid) -> tuple[list[dict], dict]:
    """Events for `rid` up to and including its `complete` or `error`."""
    events = []
    while True:
        ev = await recv(ws)
        if ev.get("id") != rid:
            continue
        if ev["type"] in ("complete", "error"):
            return events, ev
        events.append(ev)


def metric(ferry, name: str, **labels) -> float:
    with urllib.request.urlopen(ferry.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


IMAGE = {"type": "inference", "model": "tiny", "prompt": "a photo of a cat", "size": "32x32"}


def test_progress_events_per_image_per_step_then_the_images(ferry):
    async def go():
        async with aiohttp.ClientSession() as s, s.ws_connect(ferry.url + "/v1/ws") as ws:
            await ws.send_json({**IMAGE, "id": "i1", "n": 2, "seed": 21,
                                "num_inference_steps": 5})
            await ws.send_json({**IMAGE, "id": 2, "n": 1, "seed": 4, "size": "16x16",
                                "num_inference_steps": 3})
            got: dict = {"i1": [], 2: []}
            done: dict = {}
            while len(done) < 2:
                ev = await recv(ws)
                if ev["type"] == "progress":
                    assert ev["id"] not in done, "progress after the request's end"
                    got[ev["id"]].append(ev)
                else:
                    assert ev["type"] == "complete", ev
                    done[ev["id"]] = ev
            return got, done
    got, done = run(go())
    for rid, n, steps in (("i1", 2, 5), (2, 1, 3)):
        for image in range(n):
            mine = [(e["step"], e["steps"]) for e in got[rid] if e["image"] == image]
            assert mine == [(s, steps) for s in range(1, steps + 1)], (rid, image, got[rid])
        assert len(got[rid]) == n * steps
        end = done[rid]
        assert end["model"] == "tiny" and end["finish_reason"] == "stop"
        assert len(end["data"]) == n and end["usage"]["total_tokens"] == n
    assert [d["seed"] for d in done["i1"]["data"]] == [21, 22]
    # the same seed gives the same PNG bytes over HTTP
    req = urllib.request.Request(
        ferry.url + "/v1/images/generations", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": "tiny", "prompt": "a photo of a cat", "size": "32x32",
                         "n": 2, "seed": 21, "num_inference_steps": 5}).encode())
    status, body = request_json(req, 60)
    assert status == 200, body
    assert [d["b64_json"] for d in body["data"]] == [d["b64_json"] for d in done["i1"]["data"]]
    png = base64.b64decode(done[2]["data"][0]["b64_json"])
    assert png.startswith(b"\x89PNG")


def test_stream_false_sends_only_the_result(ferry):
    async def go():
        async with aiohttp.ClientSession() as s, s.ws_connect(ferry.url + "/v1/ws") as ws:
            await ws.send_json({**IMAGE, "id": "q", "stream": False, "num_inference_steps": 4})
            return await until_terminal(ws, "q")
    events, end = run(go())
    assert events == [] and end["type"] == "complete" and len(end["data"]) == 1


def test_cancel_frees_the_rows_in_the_engine(ferry):
    cancelled = metric(ferry, "ferry_diffusion_requests_total", outcome="cancelled")

    async def go():
        async with aiohttp.ClientSession() as s, s.ws_connect(ferry.url + "/v1/ws") as ws:
            await ws.send_json({**IMAGE, "id": "long", "n": 2, "num_inference_steps": 1000})
            first = await recv(ws)
            assert first["type"] == "progress", first
            await ws.send_json({"type": "cancel", "id": "long"})
            events, end = await until_terminal(ws, "long")
            # the socket goes on serving
            await ws.send_json({**IMAGE, "id": "after", "num_inference_steps": 2})
            _, after = await until_terminal(ws, "after")
            return events, end, after
    events, end, after = run(go())
    assert end["type"] == "complete" and end["finish_reason"] == "cancelled", end
    assert end["data"] == [] and end["usage"]["total_tokens"] == 0
    assert all(e["step"] < 1000 for e in events)
    assert after["finish_reason"] == "stop" and len(after["data"]) == 1
    wait_until(lambda: metric(ferry, "ferry_diffusion_requests_total",
                              outcome="cancelled") == cancelled + 1, 30,
               "the engine counting the cancel")
    assert metric(ferry, "ferry_diffusion_active_images", model="tiny") == 0
    assert metric(ferry, "ferry_diffusion_waiting_images", model="tiny") == 0


def test_a_cancel_before_the_first_step_answers_in_images_shape(ferry):
    async def go():
        async with aiohttp.ClientSession() as s, s.ws_connect(ferry.url + "/v1/ws") as ws:
            # both frames in one write: the cancel is read before the request's task runs
            await ws.send_json({**IMAGE, "id": "early", "num_inference_steps": 1000})
            await ws.send_json({"type": "cancel", "id": "early"})
            return await until_terminal(ws, "early")
    _, end = run(go())
    assert end["type"] == "complete" and end["finish_reason"] == "cancelled", end
    assert end["data"] == [] and "choices" not in end and "text" not in end, end


def test_closing_the_socket_cancels_the_generation(ferry):
    cancelled = metric(ferry, "ferry_diffusion_requests_total", outcome="cancelled")

    async def go():
        async with aiohttp.ClientSession() as s, s.ws_connect(ferry.url + "/v1/ws") as ws:
            await ws.send_json({**IMAGE, "id": "gone", "num_inference_steps": 1000})
            assert (await recv(ws))["type"] == "progress"
    run(go())
    wait_until(lambda: metric(ferry, "ferry_diffusion_requests_total",
                              outcome="cancelled") == cancelled + 1, 30,
               "the engine cancelling the closed socket's generation")
    wait_until(lambda: metric(ferry, "ferry_diffusion_active_images", model="tiny") == 0, 10,
               "its rows leaving the batch")


@pytest.mark.parametrize("fields,code,param", [
    ({"n": 9}, "invalid_parameter", "n"),
    ({"n": "2"}, "invalid_parameter", "n"),
    ({"size": "huge"}, "invalid_parameter", "size"),
    ({"size": "30x32"}, "invalid_parameter", "size"),
    ({"size": "4096x4096"}, "invalid_parameter", "size"),
    ({"response_format": "url"}, "unsupported_response_format", "response_format"),
    ({"output_format": "webp"}, "invalid_parameter", "output_format"),
    ({"stream": "yes"}, "invalid_parameter", "stream"),
    ({"prompt": None}, "missing_field", "prompt"),
    ({"prompt": ["a", "b"]}, "invalid_parameter", "prompt"),
    ({"seed": -1}, "invalid_parameter", "seed"),
    ({"num_inference_steps": 1001}, "invalid_parameter", "num_inference_steps"),
    ({"guidance_scale": 0.5}, "invalid_parameter", "guidance_scale"),
    ({"negative_prompt": 5}, "invalid_parameter", "negative_prompt"),
])
def test_bad_image_messages_are_error_events_naming_the_field(ferry, fields, code, param):
    async def go():
        async with aiohttp.ClientSession() as s, s.ws_connect(ferry.url + "/v1/ws") as ws:
            await ws.send_json({**IMAGE, "id": "bad", **fields})
            events, end = await until_terminal(ws, "bad")
            await ws.send_json({"type": "ping", "n": 1})
            pong = await recv(ws)
            return events, end, pong
    events, end, pong = run(go())
    assert events == []
    assert end["type"] == "error" and end["code"] == code and end["param"] == param, end
    assert 400 <= end["status"] < 500
    assert "Traceback" not in end["message"] and "/work" not in end["message"]
    assert pong == {"type": "pong", "n": 1}
