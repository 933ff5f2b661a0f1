"""The digits diffusion demo model, served by `ferry serve`, closed loop: digits generated
through /v1/images/generations are read back by Ferry's own `digits` classifier (KServe
infer on the same daemon); at least 80% must be the digit the prompt asked for. The model is
trained once per version of its builders (tests/model_cache.py, run by tests/run.sh before
pytest), never per test."""
from __future__ import annotations

import base64
import io
import json
import urllib.request

import numpy as np
import pytest

from tests.integration.daemon_proc import Daemon, request_json

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def ferry(digits_diffusion_daemon):
    return digits_diffusion_daemon


def post(d: Daemon, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(d.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return request_json(req, 120)


def test_generated_digits_are_recognised_by_the_digits_classifier(ferry):
    from PIL import Image
    pixels, wanted = [], []
    for digit in range(10):
        status, body = post(ferry, "/v1/images/generations", {
            "model": "digits-diffusion", "prompt": f"a handwritten {digit}", "n": 4,
            "size": "8x8", "seed": 1000 + 10 * digit})
        assert status == 200, body
        for item in body["data"]:
            img = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
            assert img.size == (8, 8) and img.mode == "L"
            pixels.append(np.asarray(img, dtype=np.float32) / 255.0 * 16.0)
            wanted.append(digit)
    batch = np.stack(pixels).reshape(len(pixels), 64)
    status, out = post(ferry, "/v2/models/digits/infer", {"inputs": [{
        "name": "pixels", "datatype": "FP32", "shape": list(batch.shape),
        "data": batch.reshape(-1).tolist()}]})
    assert status == 200, out
    probs = np.asarray(out["outputs"][0]["data"]).reshape(len(pixels), 10)
    accuracy = float((probs.argmax(axis=1) == np.asarray(wanted)).mean())
    assert accuracy >= 0.8, f"only {accuracy:.0%} of generated digits recognised"


def test_a_larger_size_is_the_native_render_scaled(ferry):
    from PIL import Image
    body = {"model": "digits-diffusion", "prompt": "a handwritten 3", "seed": 5}
    status, small = post(ferry, "/v1/images/generations", {**body, "size": "8x8"})
    status2, big = post(ferry, "/v1/images/generations", {**body, "size": "256x256"})
    assert status == status2 == 200
    a = Image.open(io.BytesIO(base64.b64decode(small["data"][0]["b64_json"])))
    b = Image.open(io.BytesIO(base64.b64decode(big["data"][0]["b64_json"])))
    assert b.size == (256, 256)
    assert np.array_equal(np.asarray(b.resize((8, 8), Image.Resampling.NEAREST)),
                          np.asarray(a))


def test_seed_002_infer_example_through_the_demo_model(ferry):
    """Seed 002's documented /v1/infer example (its model_id the SHA-256 id of the served
    model), at the root and under /compat/api/, with the documented response fields."""
    status, models = request_json(urllib.request.Request(ferry.url + "/compat/api/v1/models"),
                                  30)
    assert status == 200, models
    listed = models["models"] if isinstance(models, dict) else models
    model_id = next(m["id"] for m in listed if m["model"] == "digits-diffusion")
    doc = {"id": "unique-request-id", "model_id": model_id,
           "prompt": "A beautiful landscape with mountains and a lake",
           "negative_prompt": "blurry, low quality", "num_inference_steps": 30,
           "guidance_scale": 7.5, "width": 512, "height": 512, "seed": 42, "num_images": 1}
    answers = []
    for path in ("/v1/infer", "/infer", "/compat/api/v1/infer"):
        status, body = post(ferry, path, doc)
        assert status == 200, (path, body)
        assert (body["id"], body["model_id"]) == ("unique-request-id", model_id)
        (image,) = body["images"]
        assert (image["seed"], image["width"], image["height"]) == (42, 512, 512)
        assert base64.b64decode(image["base64"]).startswith(b"\x89PNG")
        assert isinstance(body["processing_time"], float) and body["processing_time"] > 0
        assert (body["prompt"], body["negative_prompt"], body["num_inference_steps"],
                body["guidance_scale"]) == (doc["prompt"], doc["negative_prompt"], 30, 7.5)
        answers.append(image["base64"])
    assert len(set(answers)) == 1, "the same seed gave different PNG bytes"
    status, body = post(ferry, "/v1/infer", {**doc, "num_inference_steps": 151})
    assert status == 400 and "num_inference_steps" in json.dumps(body), body
