"""Tiny random diffusers pipelines built in code (no download): the test fixture that proves a
Stable Diffusion 1.x directory loads and runs through the diffusion engine, and the tokenizer
the digits demo model ships.

`build_tiny_sd(out)` writes the layout `StableDiffusionPipeline.save_pretrained` writes
(model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/) with networks a few
thousand parameters large; `write_clip_tokenizer(out, words)` writes a CLIP BPE tokenizer
(vocab.json, merges.txt) whose vocabulary is the bytes plus the given whole words.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["build_tiny_sd", "write_clip_tokenizer", "SCHEDULERS"]

# Ferry's names for the scheduler classes it is tested with -> diffusers class names
SCHEDULERS = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler",
              "dpm++": "DPMSolverMultistepScheduler"}
_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_clip_tokenizer(out: Path, words: tuple[str, ...] = (), max_length: int = 16) -> int:
    """Write a CLIP tokenizer into `out`; returns its vocabulary size. Each of `words` is one
    token (merged from its letters), everything else falls back to single bytes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            rule = f"{pieces[0]} {pieces[1]}"
            if rule not in merges:
                merges.append(rule)
            vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    for tok in _SPECIAL:
        vocab[tok] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": _SPECIAL[0], "eos_token": _SPECIAL[1], "unk_token": _SPECIAL[1],
         "pad_token": _SPECIAL[1]}))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
         "bos_token": _SPECIAL[0], "eos_token": _SPECIAL[1], "unk_token": _SPECIAL[1],
         "pad_token": _SPECIAL[1], "do_lower_case": True}))
    return len(vocab)


def build_tiny_sd(out: Path, *, scheduler: str = "euler", seed: int = 0,
                  sample_size: int = 16) -> Path:
    """A random SD-1.x-shaped pipeline (latent 4 channels, VAE downsampling 2x, CLIP text
    encoder) saved in the diffusers layout under `out`; images are 2*sample_size pixels."""
    import torch
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vocab = write_clip_tokenizer(out / "tokenizer", ("a", "photo", "of", "cat", "dog"))
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, bos_token_id=vocab - 2,
        eos_token_id=vocab - 1, pad_token_id=vocab - 1, projection_dim=32)).eval()
    text.save_pretrained(out / "text_encoder")
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32)
    unet.save_pretrained(out / "unet")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                        layers_per_block=1, norm_num_groups=32, sample_size=2 * sample_size)
    vae.save_pretrained(out / "vae")
    cls = getattr(diffusers, SCHEDULERS[scheduler])
    sched = cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear")
    sched.save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", cls.__name__], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False}, indent=2))
    return out
