"""An SDXL directory (a tiny random one built in code, the layout StableDiffusionXLPipeline
writes) served by `ferry serve` through the diffusion engine: OpenAI's images API returns the
PNG diffusers' own StableDiffusionXLPipeline renders for the same seed (guided, and one
unguided step as SDXL-turbo is run), and broken SDXL directories fail their load with a 422
model_load_failed naming the missing part while the good model keeps serving."""
from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import stopped_cleanly
from tests.integration.daemon_proc import Daemon, http_get, request_json

pytest.importorskip("diffusers")
pytestmark = pytest.mark.timeout(180)

# SDXL-turbo's settings: one step and no guidance unless the request asks for more
SDXL_TOML = """engine = "diffusion"

[diffusion]
default_steps = 1
default_guidance = 0.0
min_guidance = 0.0
max_batch = 4
max_size = 64
"""


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    from engines.diffusion.tiny_sdxl import build_tiny_sdxl
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "pipeline")


@pytest.fixture(scope="module")
def ferry(pipeline_dir, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(pipeline_dir, repo / "xl" / "1" / "pipeline")
    (repo / "xl" / "1" / "model.toml").write_text(SDXL_TOML)
    d = Daemon(repo, workers=1, env={"OMP_NUM_THREADS": "1"},
               extra_config='[repository]\ncontrol_mode = "explicit"\n').start(timeout_s=180)
    yield d
    stopped_cleanly(d)


def post(d: Daemon, path: str, body: dict | None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(d.url + path, data=data,
                                 headers={"Content-Type": "application/json"})
    return request_json(req, 120)


def pixels(b64: str) -> np.ndarray:
    from PIL import Image
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG" and image.size == (32, 32)
    return np.asarray(image.convert("RGB")).astype(np.float64)


def reference(pipeline_dir: Path, seed: int, steps: int, guidance: float) -> np.ndarray:
    """diffusers' StableDiffusionXLPipeline on the same directory, seeded as Ferry seeds."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(str(pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a cat", num_inference_steps=steps, guidance_scale=guidance,
                 height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(seed)).images[0]
    return (np.clip(image, 0, 1) * 255).round()


@pytest.mark.parametrize("body,steps,guidance", [
    ({"num_inference_steps": 2, "guidance_scale": 4.0}, 2, 4.0),
    ({}, 1, 0.0),          # the model's turbo defaults: one step, no unconditional pass
])
def test_images_generations_equal_diffusers_sdxl(ferry, pipeline_dir, body, steps, guidance):
    status, out = post(ferry, "/v1/images/generations",
                       {"model": "xl", "prompt": "a photo of a cat", "n": 2, "seed": 21,
                        "size": "32x32", **body})
    assert status == 200, out
    assert [item["seed"] for item in out["data"]] == [21, 22]
    first, second = (pixels(item["b64_json"]) for item in out["data"])
    assert np.abs(first - second).max() > 0                # two seeds, two images
    assert np.abs(first - reference(pipeline_dir, 21, steps, guidance)).max() <= 1
    status, again = post(ferry, "/v1/images/generations",
                         {"model": "xl", "prompt": "a photo of a cat", "seed": 21,
                          "size": "32x32", **body})
    assert status == 200 and again["data"][0]["b64_json"] == out["data"][0]["b64_json"]


def _write_broken(ferry: Daemon, pipeline_dir: Path, name: str, remove: tuple[str, ...]) -> None:
    staging = Path(tempfile.mkdtemp(prefix=".stage-", dir=ferry.repo))
    shutil.copytree(pipeline_dir, staging / "pipeline")
    for part in remove:
        shutil.rmtree(staging / "pipeline" / part)
    (staging / "model.toml").write_text(SDXL_TOML)
    (ferry.repo / name).mkdir()
    staging.rename(ferry.repo / name / "1")


@pytest.mark.parametrize("name,remove,named", [
    ("no_encoder_2", ("text_encoder_2",), "text_encoder_2/"),
    ("no_second_text", ("text_encoder_2", "tokenizer_2"), "text_encoder_2/ and tokenizer_2/"),
])
def test_broken_sdxl_directory_is_a_422_naming_what_is_missing(ferry, pipeline_dir, name,
                                                               remove, named):
    _write_broken(ferry, pipeline_dir, name, remove)
    status, err = post(ferry, f"/v2/repository/models/{name}/load", None)
    assert status == 422 and err["code"] == "model_load_failed", err
    assert named in err["message"] and "text_time" in err["message"]
    assert "Traceback" not in err["message"]
    status, _ = http_get(f"{ferry.url}/v2/models/{name}/ready", timeout=10)
    assert status != 200
    status, out = post(ferry, "/v1/images/generations",
                       {"model": "xl", "prompt": "a dog", "seed": 1, "size": "32x32"})
    assert status == 200 and len(out["data"]) == 1
