"""The Llama decoder core on tiny models: paged-cache correctness, both weight loaders against
transformers (an independent implementation), every GGUF tensor type, and bad model files.

The full-size SmolLM2 checks (greedy agreement with transformers, the chat answer) live in
tests/integration/test_llm_reference.py.
"""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from engines.llm.config import LlamaConfig, ModelLoadFailed
from engines.llm.kv_cache import PagedKVCache
from engines.llm.model import ForwardBatch, LlamaModel, load_model, random_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.timeout(120)

TINY = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_eps=1e-5,
                   max_context=256, tie_embeddings=False, bos_id=1, eos_ids=(2,))
BS = 4          # small blocks so that short prompts span many of them
TOL = 1e-4


class Seq:
    """One sequence's state across forward calls: its tokens so far and its blocks."""

    def __init__(self, tokens: list[int], blocks: list[int]) -> None:
        self.tokens, self.blocks, self.cached = tokens, blocks, 0

    def chunk(self, n: int) -> tuple[list[int], list[int]]:
        new = self.tokens[self.cached:self.cached + n]
        positions = list(range(self.cached, self.cached + len(new)))
        self.cached += len(new)
        return new, positions


def step(model: LlamaModel, kv: PagedKVCache, seqs: list[Seq], sizes: list[int]) -> torch.Tensor:
    """One forward over `sizes[i]` new tokens of each sequence; logits [len(seqs), V]."""
    ids, pos, qlens = [], [], []
    for seq, n in zip(seqs, sizes):
        new, positions = seq.chunk(n)
        ids += new
        pos += positions
        qlens.append(len(new))
    batch = ForwardBatch(torch.tensor(ids), torch.tensor(pos), qlens,
                         [s.cached for s in seqs], [s.blocks for s in seqs])
    return model(batch, kv)


def one_shot(model: LlamaModel, tokens: list[int]) -> torch.Tensor:
    blocks = -(-len(tokens) // BS)
    kv = PagedKVCache(model.cfg, blocks, BS, torch.float32, "cpu")
    return step(model, kv, [Seq(tokens, list(range(blocks)))], [len(tokens)])[0]


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, TINY.vocab_size) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny() -> LlamaModel:
    return random_model(TINY, seed=1)


def test_random_model_gives_spread_out_logits(tiny):
    logits = one_shot(tiny, prompt(9, 0))
    assert logits.shape == (TINY.vocab_size,) and logits.dtype == torch.float32
    assert logits.std() > 0.1, "degenerate weights would make every comparison below vacuous"
    assert torch.equal(random_model(TINY, seed=1).embed, tiny.embed)
    assert not torch.equal(random_model(TINY, seed=2).embed, tiny.embed)


def test_chunked_prefill_on_shuffled_blocks_matches_one_shot(tiny):
    tokens = prompt(37, 1)
    blocks = list(range(20))
    random.Random(0).shuffle(blocks)
    seq = Seq(tokens, blocks[:10])
    kv = PagedKVCache(TINY, 20, BS, torch.float32, "cpu")
    for n in (5, 1, 16, 3, 12):                 # chunks that start and end mid-block
        logits = step(tiny, kv, [seq], [n])[0]
        torch.testing.assert_close(logits, one_shot(tiny, tokens[:seq.cached]),
                                   atol=TOL, rtol=0)
    assert seq.cached == len(tokens)


def test_decode_batch_of_different_lengths_matches_each_alone(tiny):
    kv = PagedKVCache(TINY, 40, BS, torch.float32, "cpu")
    lengths = (3, 17, 8, 1)
    seqs = [Seq(prompt(n + 2, 10 + i), list(range(10 * i, 10 * i + 10)))
            for i, n in enumerate(lengths)]
    for seq, n in zip(seqs, lengths):
        step(tiny, kv, [seq], [n])
    for _ in range(2):                          # two decode steps, all four sequences at once
        logits = step(tiny, kv, seqs, [1] * len(seqs))
        for seq, row in zip(seqs, logits):
            torch.testing.assert_close(row, one_shot(tiny, seq.tokens[:seq.cached]),
                                       atol=TOL, rtol=0)


def test_prompt_inside_mixed_batch_matches_one_shot(tiny):
    kv = PagedKVCache(TINY, 64, BS, torch.float32, "cpu")
    decoding = Seq(prompt(12, 20), [40, 3, 17, 8])
    chunked = Seq(prompt(30, 21), [9, 1, 33, 60, 22, 5, 48, 11])
    fresh = Seq(prompt(13, 22), [50, 51, 2, 30])
    other = Seq(prompt(6, 23), [7, 63])
    step(tiny, kv, [decoding, chunked, other], [11, 10, 5])
    # decode rows, a cached-prefix chunk and a fresh prompt, interleaved in one call.
    logits = step(tiny, kv, [decoding, chunked, fresh, other], [1, 9, 13, 1])
    for seq, row in zip((decoding, chunked, fresh, other), logits):
        torch.testing.assert_close(row, one_shot(tiny, seq.tokens[:seq.cached]),
                                   atol=TOL, rtol=0)


def test_inconsistent_batch_is_rejected(tiny):
    kv = PagedKVCache(TINY, 4, BS, torch.float32, "cpu")
    with pytest.raises(ValueError, match="inconsistent"):
        tiny(ForwardBatch(torch.arange(9), torch.arange(9), [9], [9], [[0, 1]]), kv)
    with pytest.raises(ValueError, match="tokens"):
        tiny(ForwardBatch(torch.arange(3), torch.arange(3), [2], [2], [[0]]), kv)


def test_cache_sizing():
    per_block = PagedKVCache.bytes_per_block(TINY, 16, torch.float16)
    assert per_block == 2 * TINY.num_layers * 16 * TINY.num_kv_heads * TINY.head_dim * 2
    kv = PagedKVCache.from_budget(TINY, 10 * per_block + 1, 16, torch.float16, "cpu")
    assert kv.num_blocks == 10 and kv.block_size == 16
    assert kv.k[0].shape == (10, 16, TINY.num_kv_heads, TINY.head_dim)
    assert len(kv.v) == TINY.num_layers and kv.v[1].dtype == torch.float16


# ---- against transformers --------------------------------------------------------------------

def hf_model(arch: str, tie: bool, rope: dict | None = None, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    kwargs = dict(vocab_size=TINY.vocab_size, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=tie,
                  rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0},
                  attn_implementation="eager")
    if arch == "qwen2":
        cfg, cls = transformers.Qwen2Config(**kwargs), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.LlamaConfig(head_dim=16, **kwargs), transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():                       # HF inits norms to 1: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0].float()     # [S, V]


def check_against(ours: LlamaModel, ref, tokens: list[int], prefill: int) -> None:
    """Prefill `prefill` tokens, then decode the rest one by one; compare every step."""
    expected = hf_logits(ref, tokens)
    kv = PagedKVCache(ours.cfg, 32, BS, torch.float32, "cpu")
    seq = Seq(tokens, list(range(31, -1, -1)))
    sizes = [prefill] + [1] * (len(tokens) - prefill)
    for n in sizes:
        logits = step(ours, kv, [seq], [n])[0]
        torch.testing.assert_close(logits, expected[seq.cached - 1], atol=TOL, rtol=0)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("arch,tie,rope", [("llama", False, LLAMA3_ROPE), ("qwen2", True, None),
                                           ("llama", True, {"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 10000.0})])
def test_safetensors_directory_matches_transformers(tmp_path, arch, tie, rope):
    ref = hf_model(arch, tie, rope)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.cfg.arch == arch and ours.cfg.tie_embeddings == tie
    assert ours.cfg.attn_bias == (arch == "qwen2")
    check_against(ours, ref, prompt(40, 5), prefill=30)   # positions past the llama3 cutoff


# ---- GGUF files written the way llama.cpp's converter writes them ------------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's Q/K row permutation (pairs rotary halves for GPT-J style RoPE)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_NAMES[module]}.{kind}"


def write_gguf(path, ref, qtype_name: str, arch: str = "llama") -> dict[str, torch.Tensor]:
    """Write `ref` as a GGUF file; returns its weights as the file holds them, dequantized."""
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    cfg, qtype = ref.config, gguf.GGMLQuantizationType[qtype_name]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(256)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    stored = {}
    for name, tensor in ref.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.numpy()
        if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            array = quants.dequantize(quants.quantize(array, qtype), qtype)   # what the file holds
        stored[name] = torch.from_numpy(array.copy())
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            array = llama_cpp_permute(array, heads)
        if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(name), quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(array, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_file_matches_transformers(tmp_path, qtype):
    tie = qtype != "F32"
    ref = hf_model("llama", tie, seed=3)
    stored = write_gguf(tmp_path / "m.gguf", ref, qtype)
    ref.load_state_dict(stored, strict=False)   # the reference sees the quantized weights too
    ours = load_model(tmp_path / "m.gguf")
    assert ours.cfg.tie_embeddings == tie and ours.cfg.num_kv_heads == 2
    check_against(ours, ref, prompt(20, 6), prefill=14)


def test_qwen2_gguf_is_not_unpermuted(tmp_path):
    ref = hf_model("qwen2", tie=True, seed=4)
    write_gguf(tmp_path / "q.gguf", ref, "F32", arch="qwen2")
    check_against(load_model(tmp_path / "q.gguf"), ref, prompt(12, 7), prefill=8)


# ---- bad model files ---------------------------------------------------------------------------

def assert_load_fails(path, message: str) -> None:
    with pytest.raises(ModelLoadFailed, match=message) as info:
        load_model(path)
    assert info.value.code == "model_load_failed" and info.value.status == 422


def test_missing_file(tmp_path):
    assert_load_fails(tmp_path / "absent.gguf", "not found")


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 this is a zip, not a model")
    assert_load_fails(tmp_path / "model.gguf", "not a GGUF file")


@pytest.mark.parametrize("keep", [6, 30, 700, -10])     # header, metadata, tensor table, data
def test_truncated_gguf(tmp_path, keep):
    ref = hf_model("llama", tie=True)
    write_gguf(tmp_path / "full.gguf", ref, "Q8_0")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "full.gguf").read_bytes()[:keep])
    assert_load_fails(tmp_path / "cut.gguf", "unreadable GGUF file: truncated")


def test_gguf_of_unknown_version(tmp_path):
    (tmp_path / "v9.gguf").write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(16))
    assert_load_fails(tmp_path / "v9.gguf", "version 9 is not supported")


def test_gguf_of_unsupported_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_load_fails(tmp_path / "m.gguf", "unsupported architecture 'mamba'")


def test_directory_without_config(tmp_path):
    assert_load_fails(tmp_path, "no config.json")


def test_directory_of_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    assert_load_fails(tmp_path, "unsupported architecture 'bert'")


def test_directory_missing_a_tensor(tmp_path):
    from safetensors.torch import save_file

    ref = hf_model("llama", tie=False)
    ref.config.save_pretrained(tmp_path)
    weights = {k: v.contiguous() for k, v in ref.state_dict().items()
               if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(weights, str(tmp_path / "model.safetensors"))
    assert_load_fails(tmp_path, r"missing tensors \['layers.1.up'\]")


def test_directory_with_wrong_shapes(tmp_path):
    ref = hf_model("llama", tie=False)
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_load_fails(tmp_path, "has shape")
