"""What each architecture changes in the Llama-family block, and where its files say so.

One row per `model_type` / `general.architecture`: the LlamaConfig fields its config.json and its
GGUF metadata set, the config fields and GGUF keys it runs (exempt from the "must be neutral"
checks in engines.llm.config), the tensor names its checkpoints use beyond Llama's, whether its
norms store w - 1 (Gemma's (1 + w) RMSNorm: llama.cpp's converter adds the 1, so only
safetensors need it), and whether llama.cpp's converter permuted its Q/K rows. Facts about the
GGUF side follow llama.cpp: keys its converter writes, and what its loader fixes without a key
(SmolLM3's NoPE every fourth layer, Gemma 3's local rotary base and 5-of-6 local layers, Gemma's
query scale by model size).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from engines.llm.config import refuse

__all__ = ["Architecture", "ARCHITECTURES", "HF_MODEL_TYPES"]

Fields = dict[str, Any]
Meta = Callable[..., Any]                       # meta(key, default=None): "<arch>.<key>"


def _nothing(*_: Any) -> Fields:
    return {}


@dataclass(frozen=True, slots=True)
class Architecture:
    # config.json dict -> LlamaConfig fields (beyond the shared ones)
    hf_fields: Callable[[dict[str, Any]], Fields] = _nothing
    hf_runs: frozenset[str] = frozenset()
    hf_layer_names: dict[str, str] = field(default_factory=dict)
    hf_norm_offset: float = 0.0
    # (meta, shared LlamaConfig fields, tensor names) -> LlamaConfig fields
    gguf_fields: Callable[[Meta, Fields, set[str]], Fields] = _nothing
    gguf_runs: frozenset[str] = frozenset()
    gguf_layer_names: dict[str, str] = field(default_factory=dict)
    gguf_permuted: bool = False


_QK_NORM_HF = {"self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm"}
_POST_NORMS_HF = {"post_attention_layernorm.weight": "post_attn_norm",
                  "post_feedforward_layernorm.weight": "post_ffn_norm"}


# -- Granite: four scalars ---------------------------------------------------------------------

def _granite_hf(d: dict[str, Any]) -> Fields:
    logits = float(d.get("logits_scaling", 1.0))
    if logits == 0:
        raise refuse("logits_scaling", logits, "logits cannot be divided by zero")
    return dict(embed_scale=float(d.get("embedding_multiplier", 1.0)),
                residual_scale=float(d.get("residual_multiplier", 1.0)),
                attn_scale=float(d.get("attention_multiplier", 1.0)), logit_scale=1.0 / logits)


def _granite_gguf(meta: Meta, base: Fields, tensors: set[str]) -> Fields:
    # llama.cpp: each scale applies when present and non-zero; attention.scale absent means
    # 1/sqrt(head_dim); logit_scale divides
    logit = meta("logit_scale")
    return dict(embed_scale=float(meta("embedding_scale") or 1.0),
                residual_scale=float(meta("residual_scale") or 1.0),
                attn_scale=float(meta("attention.scale")) if meta("attention.scale") else None,
                logit_scale=1.0 / float(logit) if logit else 1.0)


# -- SmolLM3: NoPE layers ----------------------------------------------------------------------

def _smollm3_hf(d: dict[str, Any]) -> Fields:
    layers = int(d["num_hidden_layers"])
    flags = d.get("no_rope_layers")
    if flags is None:                           # transformers derives it from the interval
        interval = int(d.get("no_rope_layer_interval") or 4)
        flags = [int((i + 1) % interval != 0) for i in range(layers)]
    if not isinstance(flags, list) or len(flags) != layers:
        raise refuse("no_rope_layers", flags, f"expected one flag per layer ({layers})")
    return dict(nope_layers=tuple(i for i, rotary in enumerate(flags) if not rotary))


def _smollm3_gguf(meta: Meta, base: Fields, tensors: set[str]) -> Fields:
    # llama.cpp fixes n_no_rope_layer_step = 4 for smollm3: layer i has no rotary when
    # (i + 1) % 4 == 0 (the converter writes no key)
    return dict(nope_layers=tuple(i for i in range(base["num_layers"]) if (i + 1) % 4 == 0))


# -- Phi-3: fused matrices; LongRoPE is refused ------------------------------------------------

def _gguf_window(meta: Meta, base: Fields, sliding: Callable[[int], bool] | None) -> Fields:
    """`<arch>.attention.sliding_window` on the layers `attention.sliding_window_pattern` (one
    flag per layer, as llama.cpp's converter writes it for newer architectures) marks, else on
    those `sliding` picks, when it is shorter than the context (a longer one hides nothing).
    `sliding` None: the architecture has no fixed layer pattern, so a window without the flags
    (or with the integer form of the pattern, which is not read) is refused by name; with one,
    the integer form is left to it, as llama.cpp fixes Gemma's and Phi-3's patterns."""
    window = meta("attention.sliding_window")
    if not window or window >= base["max_context"]:
        return {}
    flags = meta("attention.sliding_window_pattern")
    key = f"{base['arch']}.attention.sliding_window_pattern"
    if isinstance(flags, list):
        if len(flags) != base["num_layers"] or not all(isinstance(f, bool) for f in flags):
            raise refuse(key, flags, f"expected one bool per layer ({base['num_layers']})")
        return dict(sliding_window=int(window),
                    window_layers=tuple(i for i, slides in enumerate(flags) if slides))
    if sliding is None:             # no fixed pattern to fall back on: refuse what is unread
        if flags is not None:
            raise refuse(key, flags, "only the per-layer list form is read")
        raise refuse(f"{base['arch']}.attention.sliding_window", window,
                     "the file does not say which layers slide (no "
                     "attention.sliding_window_pattern)")
    return dict(sliding_window=int(window),
                window_layers=tuple(i for i in range(base["num_layers"]) if sliding(i)))


def _every_layer_gguf(meta: Meta, base: Fields, tensors: set[str]) -> Fields:
    # Mistral v0.1's window covers every layer; an integer pattern here is not a fixed rule of
    # llama.cpp's, so it is refused rather than guessed at
    if isinstance(meta("attention.sliding_window_pattern"), (int, bool)):
        return _gguf_window(meta, base, None)
    return _gguf_window(meta, base, lambda i: True)


def _phi3_gguf(meta: Meta, base: Fields, tensors: set[str]) -> Fields:
    for name in ("rope_factors_long.weight", "rope_factors_short.weight"):
        if name in tensors:
            raise refuse(name, "present", "LongRoPE (Phi-3 128k, Phi-3.5) rescaling is not run")
    # every layer slides, as in transformers (llama.cpp currently ignores Phi-3's window)
    return _gguf_window(meta, base, lambda i: True)


# -- Gemma 2 / 3 -------------------------------------------------------------------------------

_GEMMA_ACTS = ("gelu_pytorch_tanh",)


def _gemma_hf(d: dict[str, Any]) -> Fields:
    for name in ("hidden_activation", "hidden_act"):
        if d.get(name) is not None and d[name] not in _GEMMA_ACTS:
            raise refuse(name, d[name], "Gemma's MLP runs tanh-approximated GELU "
                                        "(gelu_pytorch_tanh) here")
    hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    head_dim = int(d.get("head_dim") or hidden // heads)
    scalar = d.get("query_pre_attn_scalar") or head_dim
    return dict(norm_layout="sandwich", activation="gelu_tanh", embed_scale=hidden ** 0.5,
                attn_scale=float(scalar) ** -0.5,
                attn_softcap=d.get("attn_logit_softcapping") or None,
                final_softcap=d.get("final_logit_softcapping") or None)


def _gemma3_hf(d: dict[str, Any]) -> Fields:
    fields = _gemma_hf(d)
    layers = int(d["num_hidden_layers"])
    types = d.get("layer_types")
    if not isinstance(types, list) or len(types) != layers:
        pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                 for i in range(layers)]
    rope = d.get("rope_parameters") or {}
    local = rope.get("sliding_attention") if isinstance(rope, dict) else None
    if isinstance(local, dict):                 # transformers v5: parameters per layer type
        kind = local.get("rope_type", "default")
        if kind != "default":
            raise refuse("rope_parameters.sliding_attention.rope_type", kind,
                         "Gemma 3's local layers rotate without scaling here")
        theta = float(local.get("rope_theta", 10000.0))
    else:
        theta = float(d.get("rope_local_base_freq", 10000.0))
    fields.update(qk_norm="head", local_rope_theta=theta,
                  local_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention"))
    return fields


def _gemma_query_scale(base: Fields, big: int) -> float:
    # llama.cpp: the 27B models (46 / 62 layers) scale queries by 1/sqrt(n_embd / n_head),
    # the others by 1/sqrt(head_dim), as Gemma's reference code does (no GGUF key)
    if base["num_layers"] == big:
        return float(base["hidden_size"] // base["num_heads"]) ** -0.5
    return float(base["head_dim"]) ** -0.5


def _gemma2_gguf(meta: Meta, base: Fields, tensors: set[str]) -> Fields:
    # llama.cpp: sliding-window pattern 2 (even layers are local)
    return dict(norm_layout="sandwich", activation="gelu_tanh",
                embed_scale=base["hidden_size"] ** 0.5, attn_scale=_gemma_query_scale(base, 46),
                attn_softcap=meta("attn_logit_softcapping") or None,
                final_softcap=meta("final_logit_softcapping") or None,
                **_gguf_window(meta, base, lambda i: i % 2 == 0))


def _gemma3_gguf(meta: Meta, base: Fields, tensors: set[str]) -> Fields:
    # llama.cpp: sliding-window pattern 6 (layers i % 6 < 5 are local), local base 10000
    return dict(norm_layout="sandwich", activation="gelu_tanh", qk_norm="head",
                embed_scale=base["hidden_size"] ** 0.5, attn_scale=_gemma_query_scale(base, 62),
                final_softcap=meta("final_logit_softcapping") or None,
                local_rope_theta=float(meta("rope.freq_base_swa") or 10000.0),
                local_layers=tuple(i for i in range(base["num_layers"]) if i % 6 < 5),
                **_gguf_window(meta, base, lambda i: i % 6 < 5))


_GEMMA_HF_RUNS = frozenset({"hidden_activation", "hidden_act", "attn_logit_softcapping",
                            "final_logit_softcapping", "query_pre_attn_scalar"})
_GEMMA_HF_NAMES = {"post_attention_layernorm.weight": "post_attn_norm",
                   "pre_feedforward_layernorm.weight": "ffn_norm",
                   "post_feedforward_layernorm.weight": "post_ffn_norm"}

ARCHITECTURES: dict[str, Architecture] = {
    # llama.cpp's converter writes Mistral as "llama" and writes no window for it (nor for
    # Qwen2): a file that carries one slides every layer (Mistral v0.1), or Qwen2's flagged ones
    "llama": Architecture(gguf_permuted=True, gguf_fields=_every_layer_gguf),
    "mistral": Architecture(gguf_permuted=True, gguf_fields=_every_layer_gguf),
    "qwen2": Architecture(gguf_fields=lambda meta, base, _: _gguf_window(meta, base, None)),
    "qwen3": Architecture(hf_fields=lambda d: dict(qk_norm="head"), hf_layer_names=_QK_NORM_HF,
                          gguf_fields=lambda *_: dict(qk_norm="head")),
    "granite": Architecture(
        hf_fields=_granite_hf, gguf_fields=_granite_gguf, gguf_permuted=True,
        hf_runs=frozenset({"embedding_multiplier", "residual_multiplier",
                           "attention_multiplier", "logits_scaling"}),
        gguf_runs=frozenset({"attention.scale", "embedding_scale", "residual_scale",
                             "logit_scale"})),
    "olmo2": Architecture(
        hf_fields=lambda d: dict(qk_norm="full", norm_layout="post"),
        hf_layer_names={**_QK_NORM_HF, **_POST_NORMS_HF},
        gguf_fields=lambda *_: dict(qk_norm="full", norm_layout="post")),
    "phi3": Architecture(
        hf_layer_names={"self_attn.qkv_proj.weight": "qkv", "mlp.gate_up_proj.weight": "gate_up"},
        gguf_layer_names={"attn_qkv.weight": "qkv", "ffn_up.weight": "gate_up"},
        gguf_fields=_phi3_gguf),
    "smollm3": Architecture(hf_fields=_smollm3_hf, hf_runs=frozenset({"no_rope_layers"}),
                            gguf_fields=_smollm3_gguf, gguf_permuted=True),
    "gemma2": Architecture(hf_fields=_gemma_hf, hf_runs=_GEMMA_HF_RUNS,
                           hf_layer_names=_GEMMA_HF_NAMES, hf_norm_offset=1.0,
                           gguf_fields=_gemma2_gguf,
                           gguf_runs=frozenset({"attn_logit_softcapping",
                                                "final_logit_softcapping"})),
    "gemma3": Architecture(hf_fields=_gemma3_hf, hf_runs=_GEMMA_HF_RUNS,
                           hf_layer_names={**_GEMMA_HF_NAMES, **_QK_NORM_HF},
                           hf_norm_offset=1.0, gguf_fields=_gemma3_gguf,
                           gguf_runs=frozenset({"final_logit_softcapping",
                                                "rope.freq_base_swa"})),
}
# transformers spells Gemma 3's text-only model "gemma3_text"; llama.cpp "gemma3"
HF_MODEL_TYPES = {"gemma3_text": "gemma3"}
