"""Config fields and GGUF metadata keys that change the math: implemented (logits match
transformers on tiny random models) or refused at load with a stable code naming the field.
Sliding-window configs this decoder does not run (Granite / OLMo 2 `layer_types` that slide,
Qwen2 layer types that slide with the window off) are refused by name; the windows it runs are
tested against transformers in test_llm_sliding_window.py. A model
whose tokenizer cannot be built is refused too, and generation stops on every
end-of-generation token the files list."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engines.llm.config import ModelLoadFailed, UnsupportedModelConfig
from engines.llm.model import load_model
from engines.llm.safetensors_loader import config_from_hf
from tests.unit.test_llm_model import check_against, gguf_name, hf_model, llama_cpp_permute, prompt

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.timeout(120)

BASE = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rms_norm_eps=1e-5, hidden_act="silu")


def refused(field: str, **changes) -> UnsupportedModelConfig:
    with pytest.raises(UnsupportedModelConfig) as info:
        config_from_hf({**BASE, **changes})
    err = info.value
    assert err.param == field and field in err.message
    assert err.code == "unsupported_model_config" and err.status == 422
    assert isinstance(err, ModelLoadFailed)
    return err


@pytest.mark.parametrize("field,value", [
    ("hidden_act", "gelu"), ("hidden_act", "gelu_pytorch_tanh"), ("hidden_act", "relu"),
    ("mlp_bias", True), ("partial_rotary_factor", 0.5), ("attn_logit_softcapping", 50.0),
    ("final_logit_softcapping", 30.0), ("quantization_config", {"quant_method": "awq"}),
    ("logits_scaling", 8.0), ("embedding_multiplier", 12.0), ("residual_multiplier", 0.22),
    ("attention_multiplier", 0.0078125), ("use_qk_norm", True), ("no_rope_layers", [1, 0]),
    ("num_local_experts", 8), ("attention_chunk_size", 8192),
])
def test_fields_that_change_the_math_are_refused_by_name(field, value):
    refused(field, **{field: value})


@pytest.mark.parametrize("field,value", [("hidden_act", "silu"), ("hidden_act", "swish"),
                                         ("mlp_bias", False), ("partial_rotary_factor", 1.0),
                                         ("attention_dropout", 0.1), ("pretraining_tp", 2),
                                         ("quantization_config", None), ("use_cache", False)])
def test_neutral_values_pass(field, value):
    assert config_from_hf({**BASE, field: value}).arch == "llama"


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_llama_attention_bias_is_refused_qwen2_bias_runs(arch):
    # Llama's attention_bias means q/k/v *and* o_proj biases; only q/k/v ones are run
    refused("attention_bias", model_type=arch, attention_bias=True, sliding_window=None)
    assert config_from_hf({**BASE, "model_type": "qwen2"}).attn_bias


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("kind", ["dynamic", "yarn", "longrope", "su"])
def test_rope_scaling_types_not_run_are_refused(spelling, kind):
    refused(f"{spelling}.rope_type", **{spelling: {"rope_type": kind, "factor": 4.0,
                                                   "rope_theta": 10000.0}})
    refused(f"{spelling}.partial_rotary_factor",
            **{spelling: {"rope_type": "default", "partial_rotary_factor": 0.25}})


def test_real_llama_config_with_attention_bias_fails_at_load(tmp_path):
    cfg = transformers.LlamaConfig(**{k: v for k, v in BASE.items() if k != "model_type"},
                                   attention_bias=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelConfig, match="attention_bias") as info:
        load_model(tmp_path)
    assert info.value.param == "attention_bias"


def test_explicit_head_dim_runs_like_transformers(tmp_path):
    cfg = transformers.LlamaConfig(**{k: v for k, v in BASE.items() if k != "model_type"},
                                   head_dim=32, attn_implementation="eager")
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.cfg.head_dim == 32 and ours.cfg.q_size == 128
    check_against(ours, ref, prompt(16, 2), prefill=10)


# -- sliding-window attention ------------------------------------------------------------------

@pytest.mark.parametrize("changes,field", [
    (dict(model_type="granite", sliding_window=16,
          layer_types=["sliding_attention", "full_attention"]), "layer_types"),
    (dict(model_type="olmo2", sliding_window=16,
          layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    # transformers nulls the window yet builds sliding layers (and fails to run)
    (dict(model_type="qwen2", use_sliding_window=False, sliding_window=16,
          layer_types=["sliding_attention", "full_attention"]), "use_sliding_window"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=16,
          layer_types=["chunked_attention", "full_attention"]), "layer_types"),
])
def test_windows_not_run_are_refused_by_name(changes, field):
    err = refused(field, **{**changes, "max_position_embeddings": 8192})
    assert "not implemented" in err.message or "sliding" in err.message


@pytest.mark.parametrize("changes", [
    dict(model_type="mistral", sliding_window=None),       # Mistral v0.2+: no window
    dict(model_type="mistral", sliding_window=256),        # as long as the context
    dict(model_type="qwen2", use_sliding_window=False, sliding_window=16),
    dict(model_type="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=2),
    dict(model_type="qwen2", layer_types=["full_attention"] * 2, sliding_window=None),
])
def test_a_window_that_never_hides_a_token_is_accepted(changes):
    config_from_hf({**BASE, **changes})


def test_mistral_with_a_window_covering_the_context_matches_transformers(tmp_path):
    cfg = transformers.MistralConfig(**{k: v for k, v in BASE.items() if k != "model_type"},
                                     sliding_window=256, head_dim=16,
                                     attn_implementation="eager")
    torch.manual_seed(1)
    ref = transformers.MistralForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.cfg.arch == "mistral"
    check_against(ours, ref, prompt(24, 3), prefill=16)


# -- GGUF metadata -----------------------------------------------------------------------------

def write_tiny_gguf(path, ref, extra=None) -> None:
    """`ref` (a transformers Llama) as an F32 GGUF file; `extra(writer)` adds metadata."""
    cfg = ref.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(256)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if extra:
        extra(w)
    for name, tensor in ref.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.numpy()
        if ".q_proj." in name or ".k_proj." in name:
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            array = llama_cpp_permute(array, heads)
        w.add_tensor(gguf_name(name), np.ascontiguousarray(array, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def ref():
    return hf_model("llama", tie=True, seed=5)


U32, F32, BOOL = (gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32,
                  gguf.GGUFValueType.BOOL)


@pytest.mark.parametrize("key,value,vtype", [
    ("llama.expert_count", 8, U32),
    ("llama.attention.layer_norm_epsilon", 1e-5, F32),
    ("llama.final_logit_softcapping", 30.0, F32),
    ("llama.attention.value_length", 8, U32),
    ("llama.attention.causal", False, BOOL),
    ("llama.logit_scale", 0.5, F32),
])
def test_gguf_keys_that_change_the_math_are_refused_by_name(tmp_path, ref, key, value, vtype):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, ref, lambda w: w.add_key_value(key, value, vtype))
    with pytest.raises(UnsupportedModelConfig) as info:
        load_model(path)
    assert info.value.param == key and key in info.value.message
    assert info.value.code == "unsupported_model_config"


def test_gguf_window_covering_the_context_is_accepted(tmp_path, ref):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, ref, lambda w: w.add_key_value("llama.attention.sliding_window",
                                                         256, U32))
    check_against(load_model(path), ref, prompt(12, 4), prefill=8)


# -- tokenizers and stop tokens ----------------------------------------------------------------

def test_gguf_whose_tokenizer_cannot_be_built_fails_at_load(tmp_path, ref):
    path = tmp_path / "m.gguf"

    def vocab(w):
        w.add_tokenizer_model("bert")
        w.add_token_list([f"t{i}" for i in range(128)])
    write_tiny_gguf(path, ref, vocab)
    with pytest.raises(ModelLoadFailed, match="'bert' is not supported"):
        load_model(path)


def test_gguf_stops_on_every_end_of_generation_token(tmp_path, ref):
    path = tmp_path / "m.gguf"
    tokens = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += [f"t{i}" for i in range(128 - len(tokens))]

    def vocab(w):
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([3] * 6 + [1] * (128 - 6))
        w.add_token_merges([])
        w.add_bos_token_id(1)
        w.add_eos_token_id(5)                      # <|im_end|>, as SmolLM2's file says
    write_tiny_gguf(path, ref, vocab)
    model = load_model(path)
    assert model.cfg.eos_ids == (5, 3)           # <|endoftext|> too, as llama.cpp stops


def test_hf_directory_stops_on_generation_config_eos_ids(tmp_path):
    model = hf_model("llama", tie=True, seed=6)
    model.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 999]}))
    cfg = load_model(tmp_path).cfg
    assert cfg.eos_ids[:2] == (2, 7) and 999 not in cfg.eos_ids    # outside the vocabulary


def test_hf_directory_with_a_broken_tokenizer_fails_at_load(tmp_path):
    hf_model("llama", tie=True, seed=6).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadFailed, match="tokenizer.json"):
        load_model(tmp_path)
