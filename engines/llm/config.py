"""The shape of a Llama-family decoder, as both weight loaders (GGUF, safetensors) describe it.

Llama, SmolLM, Mistral and Qwen2 share one block: RMSNorm, rotary attention with grouped KV heads,
SwiGLU MLP. What differs between them fits in a few fields: Qwen2 adds a bias to Q/K/V; Llama 3.1
rescales the rotary frequencies (`rope_freq_factors`).
"""
from __future__ import annotations

from dataclasses import dataclass

from daemon.errors import FerryError

__all__ = ["LlamaConfig", "ModelLoadFailed", "SUPPORTED_ARCHITECTURES"]

# GGUF `general.architecture` / HF `model_type` values this decoder runs unchanged.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


class ModelLoadFailed(FerryError):
    """Weights that cannot be loaded: missing, not a model file, or an architecture we do not run."""

    status, code = 422, "model_load_failed"


@dataclass(slots=True, frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    max_context: int
    tie_embeddings: bool
    bos_id: int | None
    eos_ids: tuple[int, ...]
    arch: str = "llama"
    attn_bias: bool = False                        # Qwen2: Q/K/V projections carry a bias
    # Per-frequency divisors of the rotary inverse frequencies (Llama 3.1 "llama3" scaling);
    # None: plain RoPE. Length head_dim // 2.
    rope_freq_factors: tuple[float, ...] | None = None
    # Bits per weight the file stores the layer matrices in (GGUF Q4_1: 5, Q8_0: 8.5 -> 9,
    # F16: 16): `weight_format = "auto"` keeps 4-bit files 4-bit.
    weight_bits: int = 32

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def validate(self) -> LlamaConfig:
        """Raise ModelLoadFailed for shapes this decoder cannot run; returns self."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_context")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ModelLoadFailed(f"model config {name}={getattr(self, name)} must be positive")
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadFailed(f"unsupported architecture {self.arch!r}; this engine runs "
                                  f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadFailed(f"num_heads={self.num_heads} is not a multiple of "
                                  f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ModelLoadFailed(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ModelLoadFailed(f"rope_freq_factors has {len(self.rope_freq_factors)} entries, "
                                  f"expected head_dim // 2 = {self.head_dim // 2}")
        return self
