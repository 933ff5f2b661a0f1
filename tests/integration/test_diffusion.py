"""A tiny random Stable Diffusion directory (built in code, the diffusers layout) served by
`ferry serve` through the diffusion engine: OpenAI's images API end to end, seeds reproducing
the same PNG bytes alone (and within a level of them amid concurrent requests: the
batch_invariant model setting makes those exact too, tests/unit/test_diffusion_engine.py), and
every refused field."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.integration.daemon_proc import Daemon, http_get, request_json

pytest.importorskip("diffusers")

@pytest.fixture(scope="module")
def ferry(tiny_sd_daemon):
    return tiny_sd_daemon


def post(d: Daemon, path: str, body: dict, timeout: float = 60.0) -> tuple[int, dict]:
    req = urllib.request.Request(d.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return request_json(req, timeout)


def pngs(body: dict) -> list[bytes]:
    return [base64.b64decode(item["b64_json"]) for item in body["data"]]


def test_images_generations_returns_pngs_with_their_seeds(ferry):
    from PIL import Image
    status, body = post(ferry, "/v1/images/generations",
                        {"model": "tiny", "prompt": "a photo of a cat", "n": 2,
                         "size": "32x24", "seed": 11, "response_format": "b64_json"})
    assert status == 200, body
    assert [item["seed"] for item in body["data"]] == [11, 12]
    images = [Image.open(io.BytesIO(p)) for p in pngs(body)]
    assert all(im.format == "PNG" and im.size == (32, 24) for im in images)
    assert isinstance(body["created"], int)
    # model omitted: the only image model serves; size auto: its native 32x32
    status, body = post(ferry, "/v1/images/generations", {"prompt": "a dog", "size": "auto"})
    assert status == 200, body
    assert Image.open(io.BytesIO(pngs(body)[0])).size == (32, 32)


def test_same_seed_same_bytes_alone_and_in_company(ferry):
    request = {"model": "tiny", "prompt": "a photo of a dog", "seed": 5,
               "num_inference_steps": 3, "guidance_scale": 5.0}
    status, alone = post(ferry, "/v1/images/generations", request)
    assert status == 200, alone
    others = [{"model": "tiny", "prompt": "a cat", "seed": s, "n": 2, "size": sz,
               "num_inference_steps": st}
              for s, sz, st in [(1, "32x32", 6), (2, "16x16", 2), (3, "32x32", 4)]]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post, ferry, "/v1/images/generations", b) for b in others]
        mine = pool.submit(post, ferry, "/v1/images/generations", request)
        results = [f.result() for f in futures]
        status, company = mine.result()
    assert status == 200 and all(s == 200 for s, _ in results)
    status, again = post(ferry, "/v1/images/generations", request)
    assert hashlib.sha256(pngs(again)[0]).digest() == hashlib.sha256(pngs(alone)[0]).digest()
    # beside other rows in one forward (batch_invariant off) a few pixels may move a level
    from PIL import Image
    diff = np.abs(np.asarray(Image.open(io.BytesIO(pngs(company)[0])), dtype=np.int16) -
                  np.asarray(Image.open(io.BytesIO(pngs(alone)[0])), dtype=np.int16))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    _, stats = http_get(ferry.url + "/v2/models/tiny/stats", timeout=10)
    status, meta = http_get(ferry.url + "/v2/models/tiny", timeout=10)
    assert status == 200 and meta["platform"] == "ferry_diffusion"


@pytest.mark.parametrize("body,status,code,param", [
    ({"prompt": "x", "response_format": "url"}, 400, "unsupported_response_format",
     "response_format"),
    ({"prompt": "x", "response_format": "jpeg"}, 400, "invalid_parameter", "response_format"),
    ({"prompt": "x", "output_format": "webp"}, 400, "invalid_parameter", "output_format"),
    ({"prompt": "x", "size": "big"}, 400, "invalid_parameter", "size"),
    ({"prompt": "x", "size": "30x32"}, 400, "invalid_parameter", "size"),
    ({"prompt": "x", "size": "4096x4096"}, 400, "invalid_parameter", "size"),
    ({"prompt": "x", "n": 5}, 400, "invalid_parameter", "n"),
    ({"prompt": "x", "n": "2"}, 400, "invalid_parameter", "n"),
    ({"prompt": "x", "seed": -3}, 400, "invalid_parameter", "seed"),
    ({"prompt": "x", "guidance_scale": 50}, 400, "invalid_parameter", "guidance_scale"),
    ({"prompt": "x", "num_inference_steps": 0}, 400, "invalid_parameter",
     "num_inference_steps"),
    ({"prompt": ""}, 400, "invalid_parameter", "prompt"),
    ({"n": 1}, 400, "missing_field", "prompt"),
    ({"prompt": 7}, 400, "invalid_parameter", "prompt"),
    ({"model": "nope", "prompt": "x"}, 404, "model_not_found", "model"),
])
def test_bad_image_requests_are_4xx_naming_the_field(ferry, body, status, code, param):
    got, answer = post(ferry, "/v1/images/generations", {"model": "tiny", **body})
    assert got == status, answer
    assert answer["error"]["code"] == code and answer["error"]["param"] == param


def test_a_body_that_is_not_an_object_is_400(ferry):
    req = urllib.request.Request(ferry.url + "/v1/images/generations", data=b"[1, 2]",
                                 headers={"Content-Type": "application/json"})
    status, body = request_json(req, 10)
    assert status == 400 and body["error"]["code"] == "invalid_json"
