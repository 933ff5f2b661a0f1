"""Qwen3, Granite, OLMo 2, Phi-3, SmolLM3, Gemma 2 and Gemma 3 (text) on tiny random models built
from transformers' own config classes: logits match transformers (float32, <= 1e-4) through the
paged cache (a prefill, then one decode step per token), loaded from a safetensors directory and
from a GGUF file written the way llama.cpp's converter writes that architecture (its tensor names,
metadata keys, Q/K permutation, Gemma's folded (1 + w) norms). Config fields and GGUF keys these
architectures change the math with are run or refused by name."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engines.llm.config import UnsupportedModelConfig
from engines.llm.kv_cache import PagedKVCache
from engines.llm.model import ForwardBatch, load_model
from engines.llm.safetensors_loader import config_from_hf
from tests.unit.test_llm_model import (BS, TOL, Seq, check_against, hf_logits, llama_cpp_permute,
                                       one_shot, prompt, step)
from tests.unit.test_llm_sliding_window import chunks_match

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.timeout(120)

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-5, attn_implementation="eager", pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
GEMMA_ROPE3 = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
               "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}

# arch -> (config class, model class, config kwargs beyond SHAPE)
MODELS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=False)),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(embedding_multiplier=6.0, residual_multiplier=0.3,
                     attention_multiplier=0.09, logits_scaling=4.0)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(tie_word_embeddings=False)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM",
                dict(num_hidden_layers=4, tie_word_embeddings=True)),   # layer 3 is NoPE
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=256,
                    attn_logit_softcapping=0.5, final_logit_softcapping=3.0,
                    initializer_range=0.15)),   # GELU's tanh form and the caps must matter
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=24,
                    sliding_window=256, rope_parameters=GEMMA_ROPE3, initializer_range=0.15)),
}


def hf_model(arch: str, seed: int = 0, **changes):
    config_cls, model_cls, extra = MODELS[arch]
    cfg = getattr(transformers, config_cls)(**{**SHAPE, **extra, **changes})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():                       # HF inits norms to 1 (Gemma: 0): make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch", list(MODELS))
def test_safetensors_directory_matches_transformers(tmp_path, arch):
    ref = hf_model(arch, seed=1)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.cfg.arch == ("gemma3" if arch == "gemma3" else ref.config.model_type)
    check_against(ours, ref, prompt(24, 2), prefill=17)


def test_what_each_architecture_sets():
    def cfg(arch, **changes):
        return config_from_hf(hf_model(arch, **changes).config.to_dict())
    assert cfg("qwen3").qk_norm == "head"
    assert (cfg("olmo2").qk_norm, cfg("olmo2").norm_layout) == ("full", "post")
    granite = cfg("granite")
    assert (granite.embed_scale, granite.residual_scale, granite.attn_scale,
            granite.logit_scale) == (6.0, 0.3, 0.09, 0.25)
    assert cfg("smollm3", num_hidden_layers=8).nope_layers == (3, 7)
    gemma2 = cfg("gemma2")
    assert (gemma2.norm_layout, gemma2.activation, gemma2.attn_softcap,
            gemma2.final_softcap) == ("sandwich", "gelu_tanh", 0.5, 3.0)
    assert gemma2.attn_scale == pytest.approx(24 ** -0.5) and gemma2.tie_embeddings
    gemma3 = cfg("gemma3")
    assert gemma3.local_layers == (0, 1, 2, 3, 4) and gemma3.local_rope_theta == 10000.0
    assert gemma3.rope_theta == 1e6 and gemma3.rope_freq_factors == (8.0,) * 8


@pytest.mark.parametrize("arch", ["gemma2", "olmo2", "smollm3"])
def test_deterministic_mode_matches_transformers(tmp_path, arch):
    """Deterministic mode attends row by row (soft-capped for Gemma 2); same logits."""
    ref = hf_model(arch, seed=3)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    tokens = prompt(14, 4)
    expected = hf_logits(ref, tokens)
    kv = PagedKVCache(ours.cfg, 8, BS, torch.float32, "cpu")
    seq = Seq(tokens, list(range(8)))
    for n in (9, 1, 4):
        new, positions = seq.chunk(n)
        batch = ForwardBatch(torch.tensor(new), torch.tensor(positions), [len(new)],
                             [seq.cached], [seq.blocks])
        logits = ours(batch, kv, deterministic=True)[0]
        torch.testing.assert_close(logits, expected[seq.cached - 1], atol=TOL, rtol=0)


def test_mixed_batch_of_a_soft_capped_model_matches_each_alone(tmp_path):
    ref = hf_model("gemma2", seed=5)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    kv = PagedKVCache(ours.cfg, 32, BS, torch.float32, "cpu")
    a, b, c = (Seq(prompt(n, 10 + n), list(range(8 * i, 8 * i + 8)))
               for i, n in enumerate((11, 20, 7)))
    step(ours, kv, [a, b], [10, 12])
    logits = step(ours, kv, [a, b, c], [1, 8, 7])       # decode, cached-prefix chunk, fresh
    for seq, row in zip((a, b, c), logits):
        torch.testing.assert_close(row, hf_logits(ref, seq.tokens[:seq.cached])[-1],
                                   atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", list(MODELS))
def test_int8_and_int4_weights_follow_the_float_model(tmp_path, arch):
    hf_model(arch, seed=11).save_pretrained(tmp_path)
    exact = load_model(tmp_path)
    # int4 re-quantizes these float weights per group of 32 (~8% weight error on Gaussian
    # matrices, README's table), int8 per row (~1%)
    for fmt, bound in (("int8", 0.999), ("int4", 0.95)):
        quantized = load_model(tmp_path, weights=fmt)
        assert quantized.weight_format == fmt
        for n in (1, 12):
            a, b = one_shot(exact, prompt(n, n)), one_shot(quantized, prompt(n, n))
            cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
            assert cos > bound, (fmt, n, cos)


# -- sliding-window layers ---------------------------------------------------------------------

W = 5                           # far shorter than the prompts: most keys fall out of the window
WINDOWED = {"qwen3": dict(use_sliding_window=True, sliding_window=W, max_window_layers=1),
            "phi3": dict(sliding_window=W),
            "smollm3": dict(use_sliding_window=True, sliding_window=W),     # its NoPE layer
            "gemma2": dict(sliding_window=W), "gemma3": dict(sliding_window=W)}


@pytest.mark.parametrize("arch", list(WINDOWED))
def test_sliding_window_layers_match_transformers(tmp_path, arch):
    ref = hf_model(arch, seed=12, **WINDOWED[arch])
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.cfg.sliding_window == W and ours.cfg.window_layers
    assert len(ours.cfg.window_layers) < ours.cfg.num_layers or arch == "phi3"
    check_against(ours, ref, prompt(24, 13), prefill=17)


@pytest.mark.parametrize("arch,layers", [("gemma2", (0, 2, 4)), ("gemma3", (0, 1, 2, 3, 4))])
def test_gemma_configs_without_layer_types_slide_as_transformers_reads_them(arch, layers):
    """Hub configs written before `layer_types` (gemma-2-2b's) get transformers' default."""
    d = hf_model(arch, num_hidden_layers=6, sliding_window=64).config.to_dict()
    del d["layer_types"]
    cfg = config_from_hf(d)
    assert cfg.window_layers == layers and cfg.sliding_window == 64
    assert getattr(transformers, MODELS[arch][0])(**d).layer_types == [
        "sliding_attention" if i in layers else "full_attention" for i in range(6)]


def test_windowed_chunks_on_a_cached_prefix_and_deterministic_rows_match(tmp_path):
    ref = hf_model("gemma3", seed=14, sliding_window=W)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    tokens = prompt(26, 15)
    chunks_match(ours, tokens, hf_logits(ref, tokens))


def test_a_window_changes_the_logits():
    """The window tests above are not vacuous: the same weights without it differ."""
    windowed = hf_model("gemma2", seed=16, sliding_window=W)
    full = hf_model("gemma2", seed=16)
    tokens = prompt(20, 17)
    assert float((hf_logits(windowed, tokens)[-1] - hf_logits(full, tokens)[-1]).abs().max()) > 1e-2


@pytest.mark.parametrize("arch", ["phi3", "gemma2", "gemma3"])
def test_sliding_window_gguf_matches_transformers(tmp_path, arch):
    ref = hf_model(arch, seed=18, **{**GGUF_CHANGES.get(arch, {}), **WINDOWED[arch]})
    write_arch_gguf(tmp_path / "m.gguf", ref, arch,
                    extra=lambda w: w.add_sliding_window(W) if arch == "phi3" else None)
    ours = load_model(tmp_path / "m.gguf")
    assert ours.cfg.sliding_window == W
    check_against(ours, ref, prompt(20, 19), prefill=12)


def hf_greedy(ref, tokens: list[int], n: int) -> list[int]:
    out = list(tokens)
    for _ in range(n):
        out.append(int(hf_logits(ref, out)[-1].argmax()))
    return out[len(tokens):]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "phi3"])
def test_engine_generates_what_transformers_generates(tmp_path, arch):
    """The engine's continuous batching and chunked prefill (12 tokens a step) over a model with
    sliding-window (and, Gemma 2, soft-capped) layers: greedy tokens equal transformers' for
    every request of the batch. Phi-3 slides every layer, so its blocks behind the window go
    back to the pool as it runs."""
    from engines.base import GenerateRequest
    from engines.llm.engine import LLMEngine, LLMOptions
    from engines.llm.sampling import SamplingParams

    ref = hf_model(arch, seed=20, sliding_window=W)
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    shared = prompt(9, 21)                       # requests sharing a prefix
    requests = {f"r{i}": shared + prompt(3 + 4 * i, 22 + i) for i in range(4)}
    block_bytes = PagedKVCache.bytes_per_block(model.cfg, 4, torch.float32)
    engine = LLMEngine()
    engine.start(model, LLMOptions(kv_cache_mb=256 * block_bytes / 2**20, block_size=4,
                                   max_num_seqs=4, max_batched_tokens=12))
    assert engine.scheduler.cfg.window == (W if arch == "phi3" else None)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    for rid, tokens in requests.items():
        engine.submit(GenerateRequest(rid, tokens, params))
    got: dict[str, list[int]] = {}
    for _ in range(500):
        if not engine.has_work():
            break
        for out in engine.step():
            got.setdefault(out.id, []).extend(out.token_ids)
    assert not engine.has_work()
    for rid, tokens in requests.items():
        assert got[rid] == hf_greedy(ref, tokens, 10), rid


# -- refused by name ---------------------------------------------------------------------------

def refused(arch: str, field: str, **changes) -> None:
    config = hf_model(arch).config.to_dict()
    config.update(changes)
    with pytest.raises(UnsupportedModelConfig) as info:
        config_from_hf(config)
    assert info.value.param == field and field in info.value.message
    assert info.value.code == "unsupported_model_config" and info.value.status == 422


@pytest.mark.parametrize("arch,field,changes", [
    ("qwen3", "attention_bias", dict(attention_bias=True)),          # o_proj bias too
    ("granite", "attention_bias", dict(attention_bias=True)),
    ("olmo2", "attention_bias", dict(attention_bias=True)),
    ("granite", "logits_scaling", dict(logits_scaling=0.0)),
    ("granite", "mlp_bias", dict(mlp_bias=True)),
    ("smollm3", "no_rope_layers", dict(no_rope_layers=[1, 0])),      # not one per layer
    ("phi3", "rope_parameters.rope_type",
     dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                           "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})),
    ("phi3", "rope_parameters.partial_rotary_factor",
     dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                           "partial_rotary_factor": 0.75})),
    ("gemma2", "hidden_activation", dict(hidden_activation="gelu")),
    ("gemma2", "sliding_window", dict(sliding_window=0)),
    ("gemma3", "use_bidirectional_attention", dict(use_bidirectional_attention=True)),
    ("gemma3", "rope_parameters.sliding_attention.rope_type",
     dict(rope_parameters={**GEMMA_ROPE3, "sliding_attention": {"rope_type": "linear",
                                                                "factor": 2.0}})),
])
def test_fields_not_run_are_refused_by_name(arch, field, changes):
    refused(arch, field, **changes)


# -- GGUF files as llama.cpp's converter writes them -------------------------------------------

_GGUF_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}
PERMUTED = ("granite", "smollm3")            # LlamaModel subclasses in convert_hf_to_gguf.py


def gguf_tensor_name(arch: str, hf: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    if module == "post_attention_layernorm":     # Llama's pre-MLP norm; OLMo 2 / Gemma's post
        name = "post_attention_norm" if arch in ("olmo2", "gemma2", "gemma3") else "ffn_norm"
    else:
        name = _GGUF_LAYER[module]
    return f"blk.{layer}.{name}.{kind}"


def gguf_metadata(w, arch: str, cfg) -> None:
    """The keys convert_hf_to_gguf.py writes for `arch` (the ones that change the math)."""
    if arch == "granite":
        w.add_attention_scale(cfg.attention_multiplier)
        w.add_embedding_scale(cfg.embedding_multiplier)
        w.add_residual_scale(cfg.residual_multiplier)
        w.add_logit_scale(cfg.logits_scaling)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma3":                        # rope scaling of the global layers
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(8.0)


def write_arch_gguf(path, ref, arch: str, qtype_name: str = "F32", extra=None
                    ) -> dict[str, torch.Tensor]:
    """`ref` as llama.cpp's converter writes it; returns the weights the file holds (quantized
    ones dequantized, norms as transformers reads them) for the reference to load."""
    from gguf import quants

    cfg, qtype = ref.config, gguf.GGMLQuantizationType[qtype_name]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    gguf_metadata(w, arch, cfg)
    if extra:
        extra(w)
    stored = {}
    for name, tensor in ref.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.numpy()
        if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            array = quants.dequantize(quants.quantize(array, qtype), qtype)   # what the file holds
        stored[name] = torch.from_numpy(array.copy())
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            array = array + 1                   # the converter folds Gemma's (1 + w)
        if arch in PERMUTED and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            array = llama_cpp_permute(array, heads)
        if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_tensor_name(arch, name), quants.quantize(array, qtype),
                         raw_dtype=qtype)
        else:
            w.add_tensor(gguf_tensor_name(arch, name), np.ascontiguousarray(array, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


# The GGUF forms of the test models: llama.cpp fixes Gemma's query scale (1/sqrt(head_dim) below
# 27B) and Gemma 3's local rotary base (10000), so the references use those.
GGUF_CHANGES = {"gemma2": dict(query_pre_attn_scalar=16), "gemma3": dict(query_pre_attn_scalar=16)}


@pytest.mark.parametrize("arch", list(MODELS))
def test_gguf_file_matches_transformers(tmp_path, arch):
    ref = hf_model(arch, seed=6, **GGUF_CHANGES.get(arch, {}))
    write_arch_gguf(tmp_path / "m.gguf", ref, arch)
    ours = load_model(tmp_path / "m.gguf")
    assert ours.cfg.arch == arch
    check_against(ours, ref, prompt(20, 7), prefill=13)


@pytest.mark.parametrize("arch,qtype", [("phi3", "Q4_0"), ("phi3", "Q8_0"), ("qwen3", "Q4_1"),
                                        ("gemma3", "Q8_0")])
def test_quantized_gguf_matches_transformers_on_the_files_weights(tmp_path, arch, qtype):
    """Phi-3's fused Q/K/V and gate/up blocks are cut into parts, 4-bit groups included."""
    ref = hf_model(arch, seed=8, **GGUF_CHANGES.get(arch, {}))
    stored = write_arch_gguf(tmp_path / "m.gguf", ref, arch, qtype)
    ref.load_state_dict(stored, strict=False)
    ours = load_model(tmp_path / "m.gguf")
    check_against(ours, ref, prompt(16, 9), prefill=10)
    if qtype.startswith("Q4"):
        assert "layers.0.q" in ours._int4_groups and "layers.1.up" in ours._int4_groups


U32, F32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32


@pytest.mark.parametrize("arch,key,value,vtype", [
    ("gemma3", "gemma3.attn_logit_softcapping", 50.0, F32),    # not a Gemma 3 field
    ("qwen3", "qwen3.logit_scale", 0.5, F32),
    ("qwen3", "qwen3.attention.sliding_window", 64, U32),   # which layers: no llama.cpp rule
    ("olmo2", "olmo2.embedding_scale", 2.0, F32),
])
def test_gguf_keys_not_run_are_refused_by_name(tmp_path, arch, key, value, vtype):
    ref = hf_model(arch, **GGUF_CHANGES.get(arch, {}))
    write_arch_gguf(tmp_path / "m.gguf", ref, arch,
                    extra=lambda w: w.add_key_value(key, value, vtype))
    with pytest.raises(UnsupportedModelConfig) as info:
        load_model(tmp_path / "m.gguf")
    assert info.value.param == key and info.value.code == "unsupported_model_config"


def test_fused_matrix_of_the_wrong_size_fails_the_load(tmp_path):
    from engines.llm.config import ModelLoadFailed

    hf_model("phi3").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_key_value_heads"] = 4                 # qkv_proj holds 2 KV heads
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadFailed, match="layers.0.qkv has 128 rows, the config implies 192"):
        load_model(tmp_path)


def test_phi3_longrope_gguf_is_refused_by_name(tmp_path):
    ref = hf_model("phi3")

    def factors(w):
        w.add_tensor("rope_factors_long.weight", np.ones(8, np.float32))
        w.add_tensor("rope_factors_short.weight", np.ones(8, np.float32))
    write_arch_gguf(tmp_path / "m.gguf", ref, "phi3", extra=factors)
    with pytest.raises(UnsupportedModelConfig) as info:
        load_model(tmp_path / "m.gguf")
    assert info.value.param == "rope_factors_long.weight"


# -- chat templates and stop tokens ------------------------------------------------------------

TEMPLATES = {
    "gemma3": ("<end_of_turn>", "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
               "{{ m['content'] }}<end_of_turn>\n{% endfor %}<start_of_turn>model\n"),
    "phi3": ("<|end|>", "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
             "{% endfor %}<|assistant|>\n"),
    "olmo2": ("<|endoftext|>", "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
              "{% endfor %}<|assistant|>\n"),
}


@pytest.mark.parametrize("arch", list(TEMPLATES))
def test_gguf_chat_template_and_stop_tokens_come_from_the_file(tmp_path, arch):
    from engines.llm.tokenizer import Tokenizer

    end, template = TEMPLATES[arch]
    tokens = ["<unk>", "<s>", "</s>", end, "<|endoftext|>"] if end != "<|endoftext|>" else \
        ["<unk>", "<s>", "</s>", end]
    tokens += [f"t{i}" for i in range(128 - len(tokens))]

    def vocab(w):
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([3] * 5 + [1] * (128 - 5))
        w.add_token_merges([])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_chat_template(template)
    ref = hf_model(arch, **GGUF_CHANGES.get(arch, {}))
    write_arch_gguf(tmp_path / "m.gguf", ref, arch, extra=vocab)
    cfg = load_model(tmp_path / "m.gguf").cfg
    assert cfg.eos_ids[0] == 2 and tokens.index(end) in cfg.eos_ids
    if "<|endoftext|>" in tokens:
        assert tokens.index("<|endoftext|>") in cfg.eos_ids
    from engines.llm.gguf_loader import read_gguf
    assert Tokenizer.from_gguf_file(read_gguf(tmp_path / "m.gguf")).chat_template == template


def test_hf_directory_chat_template_and_generation_eos(tmp_path):
    """A safetensors directory's tokenizer_config.json template and generation_config.json
    eos ids (Gemma 3: <eos> and <end_of_turn>) are what the model serves."""
    from tokenizers import Tokenizer as Backend, models

    ref = hf_model("gemma3")
    ref.save_pretrained(tmp_path)
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<end_of_turn>"]
                                        + [f"t{i}" for i in range(124)])}
    Backend(models.WordLevel(vocab, unk_token="<pad>")).save(str(tmp_path / "tokenizer.json"))
    template = TEMPLATES["gemma3"][1]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<bos>", "eos_token": "<eos>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    assert {1, 3} <= set(load_model(tmp_path).cfg.eos_ids)
    from engines.llm.tokenizer import Tokenizer
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").chat_template == template
