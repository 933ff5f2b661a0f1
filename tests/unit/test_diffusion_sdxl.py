"""SDXL directories through the diffusion engine, on a tiny random SDXL pipeline built in code
(engines/diffusion/tiny_sdxl.build_tiny_sdxl, the layout StableDiffusionXLPipeline.save_pretrained
writes): Ferry's own loop gives what diffusers' StableDiffusionXLPipeline gives for the same
initial latents (two guided steps, one unguided step as SDXL-turbo runs), and broken SDXL
directories are load errors naming what is missing."""
from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from daemon.errors import FerryError, InvalidInput
from engines.base import TensorRequest
from tests.unit.test_diffusion_engine import load_engine

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    from engines.diffusion.tiny_sdxl import build_tiny_sdxl
    root = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl(root / "pipeline")
    return root


@pytest.fixture(scope="module")
def engine(tiny_sdxl):
    e = load_engine(tiny_sdxl, min_guidance=0.0)
    yield e
    e.unload()


@pytest.fixture(scope="module")
def reference(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(engine, steps: int, guidance: float, latents: np.ndarray,
             negative: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ferry's final latents [1, 4, 16, 16] and PNG pixels [32, 32, 3] for one request."""
    from PIL import Image
    inputs = {"prompt": np.array([PROMPT.encode()], dtype=object), "seed": np.array([3]),
              "num_inference_steps": np.array([steps]),
              "guidance_scale": np.array([guidance], dtype=np.float32), "latents": latents}
    if negative is not None:
        inputs["negative_prompt"] = np.array([negative], dtype=object)
    engine.submit(TensorRequest("r", inputs, outputs=["images", "latents"]))
    deadline = time.monotonic() + 30
    results = []
    while engine.has_work():
        results += engine.step()
        assert time.monotonic() < deadline, "engine did not finish in time"
    (res,) = results
    assert res.error is None, res.error
    pixels = np.asarray(Image.open(io.BytesIO(res.outputs["images"][0])).convert("RGB"))
    return res.outputs["latents"], pixels


def diffusers_run(pipe, steps: int, guidance: float, latents: np.ndarray,
                  negative: str | None = None, **kw) -> tuple[np.ndarray, np.ndarray]:
    import torch
    common = dict(prompt=PROMPT, negative_prompt=negative, num_inference_steps=steps,
                  guidance_scale=guidance, height=32, width=32, **kw)
    lat = pipe(latents=torch.from_numpy(latents), output_type="latent", **common).images
    img = pipe(latents=torch.from_numpy(latents), output_type="np", **common).images
    return lat.numpy(), img[0]


@pytest.mark.parametrize("steps,guidance,negative", [
    (2, 5.0, None),          # guided, no negative prompt: zero unconditional embeddings
    (2, 5.0, b"a dog"),      # guided, the negative prompt through both encoders
    (1, 0.0, None),          # SDXL-turbo: one step, no unconditional pass
])
def test_engine_equals_diffusers_sdxl_pipeline(engine, reference, steps, guidance, negative):
    latents = np.random.default_rng(steps).standard_normal((1, 4, 16, 16)).astype(np.float32)
    mine_lat, mine_px = generate(engine, steps, guidance, latents, negative)
    ref_lat, ref_img = diffusers_run(reference, steps, guidance, latents,
                                     negative.decode() if negative else None)
    assert np.abs(ref_lat).max() > 0.5                   # the comparison is not of zeros
    np.testing.assert_allclose(mine_lat, ref_lat, atol=1e-4, rtol=1e-4)
    ref_px = (np.clip(ref_img, 0, 1) * 255).round()
    assert np.abs(mine_px.astype(np.float64) - ref_px).max() <= 1
    # the added conditioning is live: other time ids (original size) give other latents
    other, _ = diffusers_run(reference, steps, guidance, latents,
                             negative.decode() if negative else None, original_size=(64, 64))
    assert np.abs(other - ref_lat).max() > 1e-3


def test_sdxl_is_described_and_guidance_floor_follows_the_config(engine, tiny_sdxl):
    desc = engine.describe()
    assert desc["sdxl"] is True and desc["min_guidance"] == 0.0
    assert desc["width"] == desc["height"] == 32
    strict = load_engine(tiny_sdxl)              # default floor 1: guidance 0 is refused
    try:
        with pytest.raises(InvalidInput) as info:
            strict.submit(TensorRequest("g", {
                "prompt": np.array([b"x"], dtype=object),
                "guidance_scale": np.array([0.0], dtype=np.float32)}))
        assert info.value.param == "guidance_scale" and info.value.status == 400
    finally:
        strict.unload()


@pytest.mark.parametrize("section,param", [
    ({"default_guidance": 0.0}, "default_guidance"),               # below the floor of 1
    ({"min_guidance": 0.0, "default_guidance": 30.0}, "default_guidance"),
    ({"min_guidance": -1.0}, "min_guidance"),
    ({"batch_invariant": "yes"}, "batch_invariant"),
    ({"batch_invariant": 1}, "batch_invariant"),
])
def test_guidance_settings_out_of_order_are_config_errors(section, param):
    from engines.diffusion.engine import DiffusionConfig
    with pytest.raises(InvalidInput) as info:
        DiffusionConfig.from_section(section)
    assert info.value.code == "invalid_model_config" and info.value.param == f"diffusion.{param}"


def test_force_upcast_vae_decodes_in_float32(tiny_sdxl):
    import torch
    from engines.diffusion.pipeline import load_networks
    nets = load_networks(tiny_sdxl / "pipeline", "cpu", torch.bfloat16, None)
    assert nets.text_time and nets.scaling_factor == pytest.approx(0.13025)
    assert nets.vae_dtype == torch.float32
    assert next(nets.vae.parameters()).dtype == torch.float32
    assert next(nets.unet.parameters()).dtype == torch.bfloat16


def _broken(tiny_sdxl: Path, tmp_path: Path) -> Path:
    root = tmp_path / "m"
    shutil.copytree(tiny_sdxl / "pipeline", root / "pipeline")
    return root


@pytest.mark.parametrize("remove,names", [
    (("text_encoder_2",), "text_encoder_2/"),
    (("tokenizer_2",), "tokenizer_2/"),
    (("text_encoder_2", "tokenizer_2"), "text_encoder_2/ and tokenizer_2/"),
])
def test_text_time_unet_without_the_second_encoder_is_a_load_error(tiny_sdxl, tmp_path,
                                                                   remove, names):
    root = _broken(tiny_sdxl, tmp_path)
    for part in remove:
        shutil.rmtree(root / "pipeline" / part)
    with pytest.raises(FerryError) as info:
        load_engine(root)
    assert info.value.code == "model_load_failed" and info.value.status == 422
    assert f"needs {names} " in str(info.value) and "text_time" in str(info.value)


def test_second_encoder_of_the_wrong_width_is_a_load_error(tiny_sdxl, tmp_path):
    from transformers import CLIPTextModelWithProjection
    from engines.diffusion.tiny_sdxl import clip_config
    root = _broken(tiny_sdxl, tmp_path)
    vocab = len(json.loads((root / "pipeline" / "tokenizer_2" / "vocab.json").read_text()))
    shutil.rmtree(root / "pipeline" / "text_encoder_2")
    CLIPTextModelWithProjection(clip_config(vocab, 16, 24)).save_pretrained(
        root / "pipeline" / "text_encoder_2")
    with pytest.raises(FerryError) as info:
        load_engine(root)
    assert info.value.code == "model_load_failed"
    assert "cross_attention_dim 64" in str(info.value) and "(48)" in str(info.value)


def test_second_encoder_beside_a_plain_unet_is_a_load_error(tmp_path, tiny_sdxl):
    from engines.diffusion.tiny import build_tiny_sd
    root = tmp_path / "m"
    build_tiny_sd(root / "pipeline")
    shutil.copytree(tiny_sdxl / "pipeline" / "text_encoder_2",
                    root / "pipeline" / "text_encoder_2")
    with pytest.raises(FerryError) as info:
        load_engine(root)
    assert info.value.code == "model_load_failed"
    assert "text_encoder_2/ is present" in str(info.value)
