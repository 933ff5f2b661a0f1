"""Seed 002 (AI Inference API, ../shared/seeds/002-ai-inference-api.md): root and v1 info,
health, the model list by SHA-256 id (checked against the files themselves), one model, and
POST /infer with the documented request: a 4xx naming the missing image-generation capability
while no diffusion model is loaded. OpenAI's /v1/models keeps its shape at the root; a second
daemon with [compat] root = "api" serves seed 002's there."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.integration.compat_client import stop_cleanly
from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon
from tests.integration.secure_daemon import call

pytestmark = pytest.mark.timeout(240)

INFER = {"id": "unique-request-id", "model_id": "model-hash-1",
         "prompt": "A beautiful landscape with mountains and a lake",
         "negative_prompt": "blurry, low quality", "num_inference_steps": 30,
         "guidance_scale": 7.5, "width": 512, "height": 512, "seed": 42, "num_images": 1}


def _daemon(demo_models, tmp_path_factory, extra: str = ""):
    repo = tensor_repo(demo_models, tmp_path_factory, ("digits", "minilm"))
    d = Daemon(repo, workers=1, extra_config=extra).start()
    d.repo_root = repo
    return d


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = _daemon(demo_models, tmp_path_factory)
    yield d
    stop_cleanly(d)


P = "/compat/api"


def test_root_and_v1(ferry):
    status, _, body = call(ferry, "GET", "/")
    assert status == 200 and body["latest_version"] == "v1" and body["links"]["v1"] == "/v1"
    status, _, body = call(ferry, "GET", "/v1")
    assert status == 200 and body["version"] == "v1" and "/v1/infer" in body["endpoints"]


def test_health(ferry):
    for path in (f"{P}/health", "/v1/health", f"{P}/v1/health"):
        status, _, body = call(ferry, "GET", path)
        assert status == 200 and body["status"] == "healthy" and body["device"] == "cpu", body
    assert call(ferry, "GET", "/health")[2] is None       # Ferry's probe: root = ""


def test_models_by_sha256(ferry):
    status, _, body = call(ferry, "GET", f"{P}/v1/models", key="your-api-key")
    assert status == 200, body
    assert body["count"] == len(body["models"]) == 2
    for m in body["models"]:
        assert set(m) >= {"id", "name", "size", "path", "extension"}
        f = ferry.repo_root / m["path"]
        assert f.name == m["name"] and f.suffix == m["extension"] == ".onnx"
        assert f.stat().st_size == m["size"]
        assert m["id"] == hashlib.sha256(Path(f).resolve().read_bytes()).hexdigest()
        status, _, one = call(ferry, "GET", f"{P}/v1/models/{m['id']}")
        assert status == 200 and one == m, one
    status, _, body = call(ferry, "GET", f"{P}/v1/models/model-hash-1")
    assert status == 404 and body["error"]["code"] == "model_not_found", body
    assert body["detail"] == body["error"]["message"]


def test_openai_models_keep_their_shape(ferry):
    status, _, body = call(ferry, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list" and "data" in body, body
    status, _, body = call(ferry, "GET", "/v1/models/digits")
    assert status == 200 and body["object"] == "model", body


def test_infer_example(ferry):
    # model-hash-1 is the README's placeholder: no such model
    for path in ("/infer", "/v1/infer", f"{P}/infer"):
        status, _, body = call(ferry, "POST", path, body=INFER)
        assert status == 404 and body["error"]["code"] == "model_not_found", body
        assert body["error"]["param"] == "model_id"
    _, _, models = call(ferry, "GET", f"{P}/v1/models")
    real = {**INFER, "model_id": models["models"][0]["id"]}
    status, _, body = call(ferry, "POST", "/v1/infer", body=real)
    assert status == 400, body
    assert body["error"]["code"] == "image_generation_unavailable"
    assert "diffusion" in body["error"]["message"]


@pytest.mark.parametrize("change,param", [
    ({"id": None}, "id"), ({"prompt": ""}, "prompt"), ({"prompt": "x" * 1001}, "prompt"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"guidance_scale": 25}, "guidance_scale"), ({"width": 100}, "width"),
    ({"height": 2048}, "height"), ({"num_images": 5}, "num_images"),
    ({"seed": -1}, "seed"), ({"steps": 3}, "steps"), ({"width": 512.5}, "width"),
])
def test_bad_infer_bodies(ferry, change, param):
    body = {k: v for k, v in {**INFER, **change}.items() if v is not None}
    status, _, answer = call(ferry, "POST", "/v1/infer", body=body)
    assert status == 400 and answer["error"]["param"] == param, answer
    assert answer["detail"] == answer["error"]["message"]


def test_root_api_serves_seed_002_models(demo_models, tmp_path_factory):
    d = _daemon(demo_models, tmp_path_factory, "[compat]\nroot = \"api\"\n")
    try:
        status, _, body = call(d, "GET", "/v1/models")
        assert status == 200 and body["count"] == 2 and "object" not in body, body
        one = body["models"][0]
        status, _, got = call(d, "GET", f"/v1/models/{one['id']}")
        assert status == 200 and got == one, got
        status, _, got = call(d, "GET", "/v1/models/nope")
        assert status == 404 and got["detail"], got
        status, _, got = call(d, "GET", "/health")
        assert status == 200 and got["status"] == "healthy", got
    finally:
        stop_cleanly(d)
