"""The digits diffusion demo model: a tiny class-conditional UNet trained here, offline, on
scikit-learn's 8x8 digits at their own size, saved in the diffusers layout so the diffusion
engine serves it exactly as it serves a Stable Diffusion directory.

It works in pixel space (no VAE: the UNet's output is the image, one gray channel in [-1, 1]);
the prompt ("a handwritten 7") reaches the UNet through cross-attention over a small frozen
CLIP text encoder, and 10% of the training prompts are empty so classifier-free guidance has
an unconditional model to push away from. Native size 8x8 (what Ferry's `digits` classifier
reads, so the closed-loop check needs no resampling); model.toml sets `resize = true`, so a
request for a larger picture (seed 002's 256-1024) gets the 8x8 render scaled up, pixel for
block. Deterministic (seed 0); about a minute on two idle cores (600 steps: 37 of 40 seeded
samples, 4 per digit, are read back as the digit asked for; 1500 steps gave 38).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from engines.diffusion.tiny import write_clip_tokenizer

__all__ = ["build_digits_diffusion", "prompt_for", "NATIVE", "MODEL_TOML"]

log = logging.getLogger(__name__)

NATIVE = 8
WORDS = ("a", "handwritten", "digit")
MODEL_TOML = """engine = "diffusion"
description = "Class-conditional diffusion on scikit-learn's digits (prompt: 'a handwritten 7')"

[diffusion]
default_steps = 20
default_guidance = 3.0
resize = true
max_size = 1024
min_size = 8
"""
_STEPS = 600
_BATCH = 48
_MAX_LEN = 8


def prompt_for(digit: int) -> str:
    return f"a handwritten {digit}"


def build_digits_diffusion(out: Path, *, iterations: int = _STEPS, seed: int = 0) -> Path:
    """Train and write `out/model.toml` + `out/pipeline/` (the diffusers layout)."""
    import diffusers
    import torch
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from sklearn.datasets import load_digits
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out)
    pipe = out / "pipeline"
    pipe.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vocab = write_clip_tokenizer(pipe / "tokenizer", WORDS, max_length=_MAX_LEN)
    tokenizer = CLIPTokenizer.from_pretrained(str(pipe / "tokenizer"))
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=_MAX_LEN, bos_token_id=vocab - 2,
        eos_token_id=vocab - 1, pad_token_id=vocab - 1, projection_dim=32)).eval()
    text.requires_grad_(False)
    unet = UNet2DConditionModel(
        sample_size=NATIVE, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=16)
    unet.set_attn_processor(AttnProcessor())
    train_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                prediction_type="epsilon")

    data = load_digits()
    pixels = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]   # [N,1,8,8]
    images = pixels * 2 - 1                                                     # [-1, 1]
    labels = data.target.astype(np.int64)
    with torch.no_grad():
        prompts = [prompt_for(d) for d in range(10)] + [""]
        ids = tokenizer(prompts, padding="max_length", max_length=_MAX_LEN, truncation=True,
                        return_tensors="pt").input_ids
        table = text(ids)[0]                                   # [11, S, 32]
    opt = torch.optim.AdamW(unet.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=iterations,
                                                pct_start=0.1)
    unet.train()
    t0 = time.monotonic()
    for it in range(iterations):
        idx = torch.from_numpy(rng.integers(0, len(images), _BATCH))
        x0 = images[idx]
        cls = torch.from_numpy(labels[idx.numpy()])
        drop = torch.from_numpy(rng.random(_BATCH) < 0.1)
        cls = torch.where(drop, torch.full_like(cls, 10), cls)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (_BATCH,))
        xt = train_sched.add_noise(x0, noise, t)
        pred = unet(xt, t, encoder_hidden_states=table[cls]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if it % 50 == 0:
            log.info("digits diffusion: step %d/%d loss %.4f (%.0f s)", it, iterations,
                     loss.item(), time.monotonic() - t0)
    unet.eval()
    unet.save_pretrained(pipe / "unet")
    text.save_pretrained(pipe / "text_encoder")
    infer_sched = DPMSolverMultistepScheduler.from_config(train_sched.config)
    infer_sched.save_pretrained(pipe / "scheduler")
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": [None, None],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False}, indent=2))
    (out / "model.toml").write_text(MODEL_TOML)
    return out
