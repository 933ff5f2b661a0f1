"""The shape of a Llama-family decoder, as both weight loaders (GGUF, safetensors) describe it.

Llama, SmolLM, Mistral, Qwen2/3, Granite, OLMo 2, Phi-3, SmolLM3 and Gemma 2/3 share one block:
RMSNorm, rotary attention with grouped KV heads, a gated MLP. What differs between them fits in a
few fields: Qwen2 adds a bias to Q/K/V; Llama 3.1 rescales the rotary frequencies
(`rope_freq_factors`); Qwen3, OLMo 2 and Gemma 3 normalize Q and K; OLMo 2 and Gemma put norms
after the attention and MLP; Granite scales embeddings, residuals, attention and logits; Gemma runs
GeGLU and soft-caps logits; SmolLM3 leaves rotary out of every fourth layer; Mistral, Qwen2/3, Gemma,
Phi-3 and SmolLM3 may slide a window over some layers. Which architecture sets which field is
engines.llm.architectures' business.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

from daemon.errors import FerryError

__all__ = ["LlamaConfig", "ModelLoadFailed", "UnsupportedModelConfig", "SUPPORTED_ARCHITECTURES",
           "SLIDING_ARCHITECTURES", "check_hf_config", "check_gguf", "hf_window"]

# GGUF `general.architecture` / HF `model_type` values this decoder runs unchanged.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo2", "phi3",
                           "smollm3", "gemma2", "gemma3")
# Architectures whose sliding-window layers run (the window masks each such layer's keys);
# Llama has none (transformers ignores a Llama config's `sliding_window`); Granite and OLMo 2
# configs whose `layer_types` slide are refused.
SLIDING_ARCHITECTURES = ("mistral", "qwen2", "qwen3", "phi3", "smollm3", "gemma2", "gemma3")
QK_NORMS = ("none", "head", "full")
NORM_LAYOUTS = ("pre", "post", "sandwich")
ACTIVATIONS = ("silu", "gelu_tanh")


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
    # Q/K RMSNorm: "head" over each head's D values (Qwen3, Gemma 3), "full" over the whole
    # projection before it is split into heads (OLMo 2).
    qk_norm: str = "none"
    # Where the block's norms sit: "pre" (Llama: before attention and MLP), "post" (OLMo 2: on
    # their outputs, before the residual add), "sandwich" (Gemma 2/3: both).
    norm_layout: str = "pre"
    activation: str = "silu"                       # the MLP gate's: SwiGLU or GeGLU (tanh GELU)
    embed_scale: float = 1.0                       # Granite embedding_multiplier, Gemma sqrt(E)
    residual_scale: float = 1.0                    # Granite residual_multiplier
    attn_scale: float | None = None                # softmax scale; None: head_dim ** -0.5
    logit_scale: float = 1.0                       # Granite 1 / logits_scaling
    attn_softcap: float | None = None              # Gemma 2: cap * tanh(scores / cap)
    final_softcap: float | None = None             # Gemma 2: the same on the logits
    nope_layers: tuple[int, ...] = ()              # layers without rotary (SmolLM3's NoPE)
    # Gemma 3's sliding-window layers rotate with their own base and no scaling.
    local_layers: tuple[int, ...] = ()
    local_rope_theta: float | None = None
    # Sliding-window attention: in `window_layers`, the query at position t sees the keys at
    # positions p with t - p < sliding_window (transformers' and llama.cpp's rule).
    sliding_window: int | None = None
    window_layers: tuple[int, ...] = ()

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
        for name, allowed in (("qk_norm", QK_NORMS), ("norm_layout", NORM_LAYOUTS),
                              ("activation", ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise ModelLoadFailed(f"model config {name}={getattr(self, name)!r} is not one of "
                                      f"{allowed}")
        if any(not 0 <= i < self.num_layers
               for i in self.nope_layers + self.local_layers + self.window_layers):
            raise ModelLoadFailed("nope_layers / local_layers / window_layers name a layer the "
                                  "model lacks")
        if self.window_layers and (self.sliding_window or 0) <= 0:
            raise ModelLoadFailed(f"sliding_window={self.sliding_window} must be positive")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ModelLoadFailed(f"rope_freq_factors has {len(self.rope_freq_factors)} entries, "
                                  f"expected head_dim // 2 = {self.head_dim // 2}")
        return self


# -- fields that change the math ---------------------------------------------------------------

class UnsupportedModelConfig(ModelLoadFailed):
    """A config.json field or GGUF metadata key whose value changes the model's math in a way
    this decoder does not implement. `param` names the field; the model is refused at load
    rather than served wrong."""

    code = "unsupported_model_config"


def refuse(field: str, value: Any, why: str) -> UnsupportedModelConfig:
    return UnsupportedModelConfig(f"{field}={value!r} is not supported: {why}", param=field)


def _off(value: Any) -> bool:
    return value is None or value is False or value == 0 or value == [] or value == {}


def _one(value: Any) -> bool:
    return value is None or value == 1 or value == 1.0


# config.json fields (any architecture) that must hold a neutral value: a test of the value and
# what the field does that this decoder would not.
_HF_NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "hidden_act": (lambda v: v in (None, "silu", "swish"), "the MLP runs SiLU (SwiGLU) only"),
    "hidden_activation": (lambda v: v in (None, "silu", "swish"),
                          "the MLP runs SiLU (SwiGLU) only"),
    "mlp_bias": (_off, "MLP projections carry no bias here"),
    "partial_rotary_factor": (_one, "rotary embeddings cover the whole head here"),
    "quantization_config": (_off, "pre-quantized checkpoints (GPTQ, AWQ, FP8, ...) are not "
                                  "read; use a float or GGUF checkpoint"),
    "attn_logit_softcapping": (_off, "no attention logit soft-capping"),
    "final_logit_softcapping": (_off, "no final logit soft-capping"),
    "logits_scaling": (_one, "logits are not rescaled"),
    "embedding_multiplier": (_one, "embeddings are not rescaled"),
    "residual_multiplier": (_one, "residuals are not rescaled"),
    "attention_multiplier": (_off, "attention uses 1/sqrt(head_dim)"),
    "query_pre_attn_scalar": (_off, "attention uses 1/sqrt(head_dim)"),
    "use_qk_norm": (_off, "no Q/K normalization"),
    "qk_layernorm": (_off, "no Q/K normalization"),
    "no_rope_layers": (lambda v: _off(v) or all(v), "every layer is rotary here (no NoPE)"),
    "attention_chunk_size": (_off, "attention is not chunked"),
    "num_local_experts": (_off, "mixture-of-experts layers are not run"),
    "num_experts": (_off, "mixture-of-experts layers are not run"),
    "use_bidirectional_attention": (_off, "attention is causal"),
}


def check_hf_config(d: dict[str, Any], runs: frozenset[str] = frozenset(),
                    arch: str | None = None) -> None:
    """Refuse (UnsupportedModelConfig naming the field) a config.json whose fields ask for math
    this decoder does not do. Fields that do not change the output (dropout, initializer_range,
    use_cache, pretraining_tp: a sliced matmul of the same product) pass. `runs`: the fields the
    architecture implements (engines.llm.architectures), which are then not checked here;
    `arch`: the architecture's name when it is not the config's `model_type`."""
    for field, (neutral, why) in _HF_NEUTRAL.items():
        if field in d and field not in runs and not neutral(d[field]):
            raise refuse(field, d[field], why)
    arch = arch or d.get("model_type")
    if arch != "qwen2" and d.get("attention_bias"):
        # Llama's (and its kin's) attention_bias puts a bias on q/k/v *and* o_proj; this decoder
        # has q/k/v only
        raise refuse("attention_bias", d["attention_bias"],
                     "biases on the attention projections (o_proj.bias) are not run for "
                     f"{arch}; Qwen2's q/k/v biases are")
    field = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    rope = d.get(field) or {}
    if isinstance(rope, dict) and not _one(rope.get("partial_rotary_factor")):
        raise refuse(f"{field}.partial_rotary_factor", rope["partial_rotary_factor"],
                     "rotary embeddings cover the whole head here")
    _check_hf_window(d, arch)


def hf_window(d: dict[str, Any], arch: Any) -> tuple[int | None, tuple[int, ...]]:
    """The sliding window a config.json asks for and the layers it applies to, as transformers
    reads them: `layer_types`, else each architecture's older spelling. A window at least as long
    as the context never hides a token: (None, ())."""
    context = d.get("max_position_embeddings") or 4096
    layers = int(d.get("num_hidden_layers") or 0)
    # transformers' default when the key is absent: Mistral 4096, Phi-3 none
    window = d.get("sliding_window", None if arch == "phi3" else 4096)
    if arch in ("qwen2", "qwen3", "smollm3") and not d.get("use_sliding_window"):
        window = None                               # their configs null it when it is off
    types = d.get("layer_types")
    if arch == "llama":
        # LlamaForCausalLM has no window: transformers ignores sliding_window and layer_types
        sliding: list[int] = []
    elif arch == "mistral":
        # MistralForCausalLM slides every layer and ignores layer_types (that is Ministral's)
        sliding = list(range(layers))
    elif isinstance(types, list) and (arch in ("qwen2", "qwen3")
                                      or any(t != "full_attention" for t in types)):
        kinds = sorted({str(t) for t in types} - {"full_attention", "sliding_attention"})
        if kinds:
            raise refuse("layer_types", kinds, "only full and sliding attention layers exist")
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
        if sliding and window is None and arch in ("qwen2", "qwen3"):
            # transformers nulls the window but still builds sliding layers, and fails
            raise refuse("use_sliding_window", d.get("use_sliding_window"),
                         "layer_types names sliding layers while the window is off")
    elif arch in ("qwen2", "qwen3"):
        # transformers v4 spelling: layers from max_window_layers (default 28) on slide
        first = d.get("max_window_layers")
        sliding = list(range(28 if first is None else int(first), layers))
    elif arch == "smollm3":                         # its NoPE layers slide
        flags = d.get("no_rope_layers") or []
        sliding = [i for i, rotary in enumerate(flags) if not rotary]
    elif arch in ("gemma2", "gemma3"):              # configs from before layer_types
        pattern = 2 if arch == "gemma2" else int(d.get("sliding_window_pattern")
                                                 or d.get("_sliding_window_pattern") or 6)
        sliding = [i for i in range(layers) if (i + 1) % pattern]
    else:
        sliding = list(range(layers)) if arch == "phi3" else []
    if window is None or window >= context or not sliding:
        return None, ()
    if not isinstance(window, int) or window <= 0:
        raise refuse("sliding_window", window, "a window is a positive number of tokens")
    return window, tuple(sliding)


def _check_hf_window(d: dict[str, Any], arch: Any) -> None:
    """Architectures without sliding-window layers (see SLIDING_ARCHITECTURES) are refused when
    their `layer_types` slide a window shorter than the context."""
    window, layers = hf_window(d, arch)
    if layers and arch not in SLIDING_ARCHITECTURES:
        context = d.get("max_position_embeddings") or 4096
        raise refuse("layer_types", d.get("layer_types"),
                     f"sliding-window attention (window {window} tokens, context {context}) is "
                     f"not implemented for {arch}")


# GGUF metadata keys under "<arch>." that must be absent (or neutral).
_GGUF_NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "attention.layer_norm_epsilon": (_off, "normalization is RMSNorm, not LayerNorm"),
    "attention.clamp_kqv": (_off, "Q/K/V are not clamped"),
    "attention.causal": (lambda v: v is None or bool(v), "attention is causal"),
    "attention.scale": (_off, "attention uses 1/sqrt(head_dim)"),
    "attn_logit_softcapping": (_off, "no attention logit soft-capping"),
    "final_logit_softcapping": (_off, "no final logit soft-capping"),
    "logit_scale": (_one, "logits are not rescaled"),
    "embedding_scale": (_one, "embeddings are not rescaled"),
    "residual_scale": (_one, "residuals are not rescaled"),
    "use_parallel_residual": (_off, "attention and MLP run one after the other"),
    "expert_count": (_off, "mixture-of-experts layers are not run"),
    "rope.scaling.attn_factor": (_one, "YaRN attention scaling is not run"),
    "attention.temperature_tuning": (_off, "attention temperature tuning is not run"),
}
_GGUF_SCALARS = ("block_count", "embedding_length", "feed_forward_length",
                 "attention.head_count", "attention.head_count_kv", "context_length")


def check_gguf(gf: Any, cfg: LlamaConfig, runs: frozenset[str] = frozenset()) -> LlamaConfig:
    """For a parsed GGUF file (engines.llm.gguf_loader.GGUFFile) and the config read from it:
    refuse metadata this decoder would silently ignore (`runs`: the keys, without the
    architecture prefix, that the architecture implements), check the file's tokenizer can be
    built (so a model the frontends could not tokenize for never reports ready), and stop
    generation on every end-of-generation token it lists. Returns the config to serve."""
    arch = cfg.arch
    for key, (neutral, why) in _GGUF_NEUTRAL.items():
        value = gf.get(f"{arch}.{key}")
        if key not in runs and not neutral(value):
            raise refuse(f"{arch}.{key}", value, why)
    for key in _GGUF_SCALARS:                       # per-layer arrays (OpenELM-style)
        if isinstance(gf.get(f"{arch}.{key}"), list):
            raise refuse(f"{arch}.{key}", "[per-layer list]", "layers must share one shape")
    value_dim = gf.get(f"{arch}.attention.value_length")
    if value_dim is not None and value_dim != cfg.head_dim:
        raise refuse(f"{arch}.attention.value_length", value_dim,
                     f"values must have the key's head size {cfg.head_dim}")
    window = gf.get(f"{arch}.attention.sliding_window")
    flags = gf.get(f"{arch}.attention.sliding_window_pattern")
    none_slide = isinstance(flags, list) and not any(flags)     # per-layer flags, all off
    if window and window < cfg.max_context and not cfg.window_layers and not none_slide:
        raise refuse(f"{arch}.attention.sliding_window", window,
                     f"sliding-window attention (context {cfg.max_context}) is not "
                     f"implemented; only a window of at least {arch}.context_length is accepted")
    if not gf.get("tokenizer.ggml.tokens") and gf.get("tokenizer.ggml.model") is None:
        return cfg                                  # ids only: nothing to check
    from engines.llm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_file(gf)              # ModelLoadFailed when it cannot be built
    return replace(cfg, eos_ids=tuple(dict.fromkeys(tok.eos_ids + cfg.eos_ids)))
