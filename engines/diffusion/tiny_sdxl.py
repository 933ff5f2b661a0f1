"""A tiny random SDXL pipeline built in code (no download): the test fixture that proves an
SDXL / SDXL-turbo directory loads and runs through the diffusion engine.

`build_tiny_sdxl(out)` writes the layout `StableDiffusionXLPipeline.save_pretrained` writes
(model_index.json, text_encoder/ + tokenizer/, text_encoder_2/ + tokenizer_2/, a text_time
unet/, vae/ with SDXL's scaling factor and force_upcast, scheduler/ with SDXL's Euler settings).
(A module of its own, not in tiny.py: tiny.py is one of the sources the test cache of demo
models is keyed by, tests/model_cache.py.)
"""
from __future__ import annotations

import json
from pathlib import Path

from engines.diffusion.tiny import write_clip_tokenizer

__all__ = ["build_tiny_sdxl", "clip_config"]


def clip_config(vocab: int, hidden: int, projection: int) -> object:
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=37,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                          bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
                          projection_dim=projection)


def build_tiny_sdxl(out: Path, *, seed: int = 0, sample_size: int = 16) -> Path:
    """A random SDXL-shaped pipeline: CLIPTextModel (width 32) + CLIPTextModelWithProjection
    (width 32, projection 24), a UNet with addition_embed_type "text_time" (cross-attention
    width 64 = both encoders side by side; added embedding 6 x 8 time ids + 24 pooled), an
    AutoencoderKL with SDXL's scaling factor and force_upcast; images are 2*sample_size
    pixels."""
    import torch
    import diffusers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    words = ("a", "photo", "of", "cat", "dog")
    vocab = write_clip_tokenizer(out / "tokenizer", words)
    write_clip_tokenizer(out / "tokenizer_2", words)
    CLIPTextModel(clip_config(vocab, 32, 32)).eval().save_pretrained(out / "text_encoder")
    CLIPTextModelWithProjection(clip_config(vocab, 32, 24)).eval().save_pretrained(
        out / "text_encoder_2")
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 24, transformer_layers_per_block=(1, 2))
    unet.save_pretrained(out / "unet")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                        layers_per_block=1, norm_num_groups=32, sample_size=2 * sample_size,
                        scaling_factor=0.13025, force_upcast=True)
    vae.save_pretrained(out / "vae")
    EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", timestep_spacing="leading",
                           steps_offset=1, interpolation_type="linear",
                           prediction_type="epsilon").save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "image_encoder": [None, None], "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True}, indent=2))
    return out
