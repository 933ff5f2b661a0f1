"""seed002_infer's (seed 002's /v1/infer) validation: every field out of range is a 400 naming
it; a valid body gets past validation to the model lookup (503 here: no daemon behind the
never-started dispatcher). The end-to-end path it shares with /v1/images/generations
(generate_images) runs in tests/integration/test_diffusion.py."""
from __future__ import annotations

import asyncio
import json

import pytest
import zmq.asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from daemon.shm import RegionMap
from frontends.dispatch import Dispatcher
from frontends.http.appkeys import DISPATCHER, SETTINGS, FrontendSettings
from frontends.http.errors import error_middleware
from frontends.http.images import seed002_infer

VALID = {"id": "r1", "model_id": "ab" * 32, "prompt": "a lake"}


async def _call(body) -> tuple[int, dict]:
    ctx = zmq.asyncio.Context()
    try:
        d = Dispatcher(ctx, placement_endpoint="inproc://none", control_endpoint="inproc://none",
                       arena=None, regions=RegionMap("seed002-test"), instance="seed002-test",
                       inline_threshold=1024)
        app = web.Application(middlewares=[error_middleware])
        app[DISPATCHER] = d
        app[SETTINGS] = FrontendSettings(0, 1 << 20, 30.0, 1024)
        app.router.add_post("/v1/infer", seed002_infer)
        async with TestClient(TestServer(app)) as client:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            resp = await client.post("/v1/infer", data=raw,
                                     headers={"Content-Type": "application/json"})
            return resp.status, await resp.json()
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("change,param", [
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 151}, "num_inference_steps"),
    ({"num_inference_steps": 2.5}, "num_inference_steps"),
    ({"guidance_scale": 0.99}, "guidance_scale"),
    ({"guidance_scale": 20.01}, "guidance_scale"),
    ({"guidance_scale": "7"}, "guidance_scale"),
    ({"width": 255}, "width"), ({"width": 1025}, "width"),
    ({"height": 128}, "height"), ({"height": True}, "height"),
    ({"num_images": 0}, "num_images"), ({"num_images": 5}, "num_images"),
    ({"seed": -1}, "seed"), ({"seed": "42"}, "seed"),
    ({"prompt": "x" * 1001}, "prompt"), ({"prompt": ""}, "prompt"),
    ({"prompt": None}, "prompt"), ({"id": None}, "id"), ({"model_id": 5}, "model_id"),
    ({"negative_prompt": ["a"]}, "negative_prompt"),
])
def test_out_of_range_fields_are_400_naming_the_field(change, param):
    body = {k: v for k, v in {**VALID, **change}.items() if v is not None}
    status, answer = asyncio.run(_call(body))
    assert status == 400, answer
    assert answer["error"]["param"] == param


def test_bounds_themselves_are_accepted():
    body = {**VALID, "num_inference_steps": 150, "guidance_scale": 1, "width": 1024,
            "height": 256, "num_images": 4, "seed": 0, "negative_prompt": "blurry"}
    status, answer = asyncio.run(_call(body))
    assert status == 503 and answer["error"]["code"] == "model_unavailable"


def test_non_object_body_is_400():
    status, answer = asyncio.run(_call(b"[]"))
    assert status == 400 and answer["error"]["code"] == "invalid_json"
