"""Reading a Llama-family model from a Hugging Face directory: config.json + *.safetensors.

Handles single files and sharded checkpoints (every *.safetensors in the directory), Llama 3.1's
"llama3" and plain "linear" RoPE scaling, and both the transformers v4 (`rope_theta`,
`rope_scaling`) and v5 (`rope_parameters`) spellings of the rotary settings.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch

from engines.llm.architectures import ARCHITECTURES, HF_MODEL_TYPES, Architecture
from engines.llm.config import (SLIDING_ARCHITECTURES, SUPPORTED_ARCHITECTURES, LlamaConfig,
                                ModelLoadFailed, check_hf_config, hf_window, refuse)

__all__ = ["open_safetensors", "config_from_hf"]

_GLOBAL_NAMES = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm",
                 "lm_head.weight": "lm_head"}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k",
    "self_attn.v_proj.weight": "v", "self_attn.q_proj.bias": "q_bias",
    "self_attn.k_proj.bias": "k_bias", "self_attn.v_proj.bias": "v_bias",
    "self_attn.o_proj.weight": "o", "mlp.gate_proj.weight": "gate",
    "mlp.up_proj.weight": "up", "mlp.down_proj.weight": "down",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _rope_factors(rope: dict[str, Any], head_dim: int, theta: float,
                  field: str) -> tuple[float, ...] | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return (float(rope["factor"]),) * (head_dim // 2)
    if kind != "llama3":
        raise refuse(f"{field}.rope_type", kind, "RoPE scaling is 'default', 'linear' or "
                     "'llama3' here (dynamic NTK, YaRN, LongRoPE change the rotary math)")
    # Llama 3.1: long wavelengths slow down by `factor`, short ones stay, the band between blends.
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_ctx = rope["original_max_position_embeddings"]
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(float(factor))
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(factors)


def config_from_hf(d: dict[str, Any]) -> LlamaConfig:
    """LlamaConfig from a transformers config.json dict."""
    model_type = d.get("model_type")
    arch = HF_MODEL_TYPES.get(model_type, model_type) if isinstance(model_type, str) else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadFailed(f"unsupported architecture {model_type!r}; this engine runs "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    check_hf_config(d, spec.hf_runs, arch)
    try:
        heads, hidden = int(d["num_attention_heads"]), int(d["hidden_size"])
        head_dim = int(d.get("head_dim") or hidden // heads)
        field = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
        rope = d.get(field) or {}
        if isinstance(rope.get("full_attention"), dict):   # per layer type (Gemma 3, v5)
            rope, field = rope["full_attention"], f"{field}.full_attention"
        theta = float(d.get("rope_theta", rope.get("rope_theta", 10000.0)))
        eos = d.get("eos_token_id")
        window, window_layers = hf_window(d, arch) if arch in SLIDING_ARCHITECTURES else (None, ())
        return LlamaConfig(
            vocab_size=int(d["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads), head_dim=head_dim,
            rope_theta=theta, rms_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_context=int(d.get("max_position_embeddings", 4096)),
            # transformers' defaults when the key is absent: tied for Gemma and SmolLM3
            tie_embeddings=bool(d.get("tie_word_embeddings",
                                      arch in ("gemma2", "gemma3", "smollm3"))),
            bos_id=d.get("bos_token_id"),
            eos_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
            arch=arch, attn_bias=arch == "qwen2",     # Llama's attention_bias is refused
            rope_freq_factors=_rope_factors(rope, head_dim, theta, field),
            sliding_window=window, window_layers=window_layers,
            **spec.hf_fields(d),
        ).validate()
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadFailed(f"config.json: missing or bad field: {exc}") from exc


def _loader_name(key: str, spec: Architecture) -> str | None:
    if key in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[key]
    match = _LAYER_RE.fullmatch(key)
    if match:
        name = spec.hf_layer_names.get(match.group(2)) or _LAYER_NAMES.get(match.group(2))
        if name:
            return f"layers.{match.group(1)}.{name}"
    return None


def _tensors(files: list[Path], cfg: LlamaConfig) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    spec = ARCHITECTURES[cfg.arch]
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = _loader_name(key, spec)
                if name == "lm_head" and cfg.tie_embeddings:
                    continue                    # a saved copy of the tied embedding
                if name is None:
                    if key.endswith("rotary_emb.inv_freq"):
                        continue                # a buffer some exports keep; we recompute it
                    raise ModelLoadFailed(f"{file}: unexpected tensor {key!r}")
                tensor = f.get_tensor(key)
                if spec.hf_norm_offset and name.endswith("norm"):
                    # Gemma's (1 + w) RMSNorm, summed in float32 as the reference does
                    tensor = tensor.float() + spec.hf_norm_offset
                yield name, tensor


def open_safetensors(path: str | Path) -> tuple[LlamaConfig, Iterator[tuple[str, torch.Tensor]]]:
    """The model config and a lazy stream of tensors from an HF model directory."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadFailed(f"{path}: no config.json (expected an HF model directory)")
    try:
        d = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadFailed(f"{config_file}: unreadable: {exc}") from exc
    if not isinstance(d, dict):
        raise ModelLoadFailed(f"{config_file}: expected a JSON object")
    cfg = _with_tokenizer(path, config_from_hf(d))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadFailed(f"{path}: no *.safetensors files")
    return cfg, _wrap_errors(_tensors(files, cfg), path)


def _with_tokenizer(path: Path, cfg: LlamaConfig) -> LlamaConfig:
    """Stop on generation_config.json's eos ids too (Llama 3: <|eot_id|> and <|eom_id|>); a
    tokenizer.json that is there must load, or the model could never serve text."""
    from engines.llm.tokenizer import Tokenizer

    eos: list[Any] = list(cfg.eos_ids)
    generation = path / "generation_config.json"
    if generation.is_file():
        try:
            listed = json.loads(generation.read_text()).get("eos_token_id")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            raise ModelLoadFailed(f"{generation}: unreadable: {exc}") from exc
        eos += listed if isinstance(listed, list) else [listed]
    if (path / "tokenizer.json").is_file():
        eos += Tokenizer.from_file(path / "tokenizer.json").eos_ids   # ModelLoadFailed if bad
    return replace(cfg, eos_ids=tuple(dict.fromkeys(
        e for e in eos if isinstance(e, int) and 0 <= e < cfg.vocab_size)))


def _wrap_errors(tensors: Iterator[tuple[str, torch.Tensor]],
                 path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        yield from tensors
    except ModelLoadFailed:
        raise
    except Exception as exc:  # safetensors raises its own error types on damaged headers
        raise ModelLoadFailed(f"{path}: unreadable safetensors: {exc}") from exc
