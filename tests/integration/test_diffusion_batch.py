"""Batch jobs of image generations against a real daemon serving the digits diffusion demo
model: items with url /v1/images/generations (and the KServe url) run through the engine and
store OpenAI's images response (the same PNG bytes as a direct request with the seed); a bad
item fails alone with its error (stable code, the field named), the others complete."""
from __future__ import annotations

import base64
import io
import json
import urllib.request

import numpy as np
import pytest

from tests.integration.daemon_proc import Daemon, request_json, wait_until

pytest.importorskip("diffusers")
pytestmark = pytest.mark.timeout(180)

IMAGES = "/v1/images/generations"


@pytest.fixture(scope="module")
def ferry(digits_diffusion_daemon):
    return digits_diffusion_daemon


def call(d: Daemon, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(d.url + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    return request_json(req, 60)


def finished(d: Daemon, job_id: str) -> dict:
    def done():
        status, job = call(d, "GET", f"/v1/batches/{job_id}")
        assert status == 200, job
        return job if job["ferry_status"] == "completed" else None
    return wait_until(done, 120, "the batch to complete")


def results(d: Daemon, job_id: str) -> dict:
    status, body = call(d, "GET", f"/v1/batches/{job_id}/results")
    assert status == 200, body
    return {row["custom_id"]: row for row in body["data"]}


def digit(prompt_digit: int, **extra) -> dict:
    return {"model": "digits-diffusion", "prompt": f"a handwritten {prompt_digit}",
            "size": "8x8", **extra}


def test_image_items_run_and_store_openais_response(ferry):
    from PIL import Image
    items = [{"custom_id": "two", "method": "POST", "url": IMAGES,
              "body": digit(2, n=2, seed=40)},
             {"custom_id": "seven", "url": IMAGES, "body": digit(7, seed=70, size="32x32")},
             {"custom_id": "kserve", "url": "/v2/models/digits-diffusion/infer", "body": {
                 "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1],
                             "data": ["a handwritten 3"]},
                            {"name": "seed", "datatype": "INT64", "shape": [1], "data": [5]},
                            {"name": "num_images", "datatype": "INT64", "shape": [1],
                             "data": [3]}],
                 "outputs": [{"name": "seeds"}]}}]
    status, job = call(ferry, "POST", "/v1/batches", {"requests": items})
    assert status == 201, job
    assert finished(ferry, job["id"])["request_counts"] == {"total": 3, "completed": 3,
                                                            "failed": 0}
    rows = results(ferry, job["id"])
    two = rows["two"]["response"]["body"]
    assert rows["two"]["status"] == "done" and rows["two"]["response"]["status_code"] == 200
    assert [d["seed"] for d in two["data"]] == [40, 41]
    assert two["usage"] == {"input_tokens": 0, "output_tokens": 2, "total_tokens": 2}
    seven = rows["seven"]["response"]["body"]
    png = base64.b64decode(seven["data"][0]["b64_json"])
    assert Image.open(io.BytesIO(png)).size == (32, 32)
    # a direct request with the same seed gives the same image: the batch's items ran beside
    # each other, and rows sharing a forward (batch_invariant off) may move a pixel a level
    status, direct = call(ferry, "POST", IMAGES, digit(7, seed=70, size="32x32"))
    assert status == 200, direct
    diff = np.abs(np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16) - np.asarray(
        Image.open(io.BytesIO(base64.b64decode(direct["data"][0]["b64_json"]))), dtype=np.int16))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    kserve = rows["kserve"]["response"]["body"]
    assert kserve["outputs"][0]["name"] == "seeds" and kserve["outputs"][0]["data"] == [5, 6, 7]
    assert kserve["usage"]["total_tokens"] == 3       # its images' units, as on the KServe route


@pytest.mark.parametrize("body,code,param", [
    (digit(1, n=9), "invalid_parameter", "n"),
    (digit(1, size="big"), "invalid_parameter", "size"),
    (digit(1, size="4096x4096"), "invalid_parameter", "size"),
    (digit(1, response_format="url"), "unsupported_response_format", "response_format"),
    (digit(1, num_inference_steps=0), "invalid_parameter", "num_inference_steps"),
    (digit(1, guidance_scale="high"), "invalid_parameter", "guidance_scale"),
    (digit(1, seed=1.5), "invalid_parameter", "seed"),
    ({"model": "digits-diffusion", "size": "8x8"}, "missing_field", "prompt"),
    ({"model": "digits", "prompt": "a handwritten 1"}, "not_an_image_model", "model"),
    ({"model": "nope", "prompt": "a handwritten 1"}, "model_not_found", "model"),
])
def test_a_bad_item_fails_alone_with_its_error(ferry, body, code, param):
    items = [{"custom_id": "good", "url": IMAGES, "body": digit(4, seed=1)},
             {"custom_id": "bad", "url": IMAGES, "body": body}]
    status, job = call(ferry, "POST", "/v1/batches", {"requests": items})
    assert status == 201, job
    assert finished(ferry, job["id"])["request_counts"] == {"total": 2, "completed": 1,
                                                            "failed": 1}
    rows = results(ferry, job["id"])
    assert rows["good"]["status"] == "done"
    bad = rows["bad"]
    assert bad["status"] == "failed" and bad["response"] is None
    error = bad["error"]
    assert error["code"] == code and error["param"] == param, error
    assert 400 <= error["status"] < 500
    assert "Traceback" not in error["message"]


def test_submission_refuses_an_image_item_without_a_model(ferry):
    status, body = call(ferry, "POST", "/v1/batches", {
        "requests": [{"url": IMAGES, "body": {"prompt": "a handwritten 1"}}]})
    assert status == 400 and body["error"]["code"] == "missing_parameter", body
    assert body["error"]["param"] == "requests[0].body.model"
    status, body = call(ferry, "POST", "/v1/batches", {
        "requests": [{"url": "/v1/images/edits", "body": digit(1)}]})
    assert status == 400 and body["error"]["code"] == "unsupported_endpoint", body
    assert body["error"]["param"] == "requests[0].url"
