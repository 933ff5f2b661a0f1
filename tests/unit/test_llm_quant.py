"""Weight-only int8 matrices (engines.llm.quant) and the decoder with them: the rounding bound,
narrow (int8 kernel) and wide (bfloat16 GEMM) paths agreeing, tied embeddings stored once, the
paged-cache step equal to a one-shot forward, and the refusals.

The full-size SmolLM2 agreement with transformers in int8 lives in
tests/integration/test_llm_reference.py.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from engines.llm.config import ModelLoadFailed
from engines.llm.engine import LLMOptions
from engines.llm.kv_cache import PagedKVCache
from engines.llm.model import random_model
from engines.llm.quant import (INT4_GROUP, NARROW_ROWS, Int4Weight, Int8Weight, linear,
                               resolve_weight_format)
from tests.unit.test_llm_model import BS, TINY, Seq, one_shot, prompt, step

pytestmark = pytest.mark.timeout(120)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_int8_rounding_is_within_half_a_step_per_row():
    w = torch.randn(48, 40) * torch.linspace(0.01, 3.0, 48)[:, None]   # rows of unequal range
    q = Int8Weight(w)
    err = (q.dequantize() - w).abs()
    step_size = q.scale.float()[:, None]
    assert q.q.dtype == torch.int8 and q.q.shape == w.shape
    assert bool((err <= step_size * 0.5 + 1e-6).all())
    assert int(q.q.abs().max()) == 127, "each row's largest value uses the full int8 range"
    assert torch.equal(q.rows(torch.tensor([3, 0, 3])), q.dequantize()[[3, 0, 3]])


def test_narrow_and_wide_paths_multiply_by_the_same_weights():
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    q = Int8Weight(w)
    x = torch.randn(NARROW_ROWS * 4, 64)
    exact = x @ q.dequantize().t()
    narrow = torch.cat([q(x[i:i + NARROW_ROWS]) for i in range(0, len(x), NARROW_ROWS)])
    wide = q(x)                                                    # > NARROW_ROWS: bfloat16 GEMM
    assert narrow.dtype == wide.dtype == torch.float32
    # bfloat16 activations: ~3 significant digits, so compare against the output's scale.
    scale = float(exact.abs().max())
    assert float((narrow - exact).abs().max()) < 0.02 * scale
    assert float((wide - exact).abs().max()) < 0.02 * scale
    bias = torch.randn(96)
    assert torch.allclose(linear(x[:2], q, bias), q(x[:2]) + bias)


def test_quantized_model_follows_the_float_model():
    ref = random_model(TINY, seed=3)
    q = random_model(TINY, seed=3)
    float_bytes = q.weight_bytes()
    q.quantize("int8")
    assert q.weight_format == "int8" and q.weight_bytes() < float_bytes
    for n in (1, 5, 40):                      # narrow and wide matmul paths
        tokens = prompt(n, seed=n)
        a, b = one_shot(ref, tokens), one_shot(q, tokens)
        assert _cos(a, b) > 0.999, n
        assert int(a.argmax()) == int(b.argmax()), n


def test_quantized_paged_steps_equal_the_one_shot_forward():
    model = random_model(TINY, seed=4)
    model.quantize("int8")
    tokens = prompt(11, seed=9)
    kv = PagedKVCache(TINY, 8, BS, torch.float32, "cpu")
    seq = Seq(tokens, [5, 2, 7])
    step(model, kv, [seq], [7])
    for _ in range(3):
        last = step(model, kv, [seq], [1])[0]
    full = one_shot(model, tokens[:10])
    assert float((last - full).abs().max()) < 0.05 * float(full.abs().max())
    assert int(last.argmax()) == int(full.argmax())


def test_tied_embeddings_are_stored_once_after_quantizing():
    cfg = dataclasses.replace(TINY, tie_embeddings=True)
    model = random_model(cfg, seed=5)
    before = one_shot(model, prompt(6, seed=1))
    model.quantize("int8")
    assert model.embed is model.lm_head and isinstance(model.embed, Int8Weight)
    assert model.lm_head.wide is None, "the head sees one row per sequence: no bfloat16 copy"
    after = one_shot(model, prompt(6, seed=1))
    assert _cos(before, after) > 0.999
    model.quantize("int8")                                  # a second call changes nothing
    assert model.embed is model.lm_head


def test_weights_cannot_be_loaded_into_a_quantized_model():
    model = random_model(TINY, seed=6)
    model.quantize("int8")
    with pytest.raises(ValueError, match="before quantizing"):
        model.weight_targets()


def test_int8_is_refused_for_bfloat16_models_and_gpus():
    model = random_model(TINY, seed=7, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32 CPU"):
        model.quantize("int8")
    with pytest.raises(ValueError, match="int8, int4 or auto"):
        model.quantize("int2")
    with pytest.raises(ValueError, match="CPU engine"):
        resolve_weight_format("int8", "cuda:0")
    assert resolve_weight_format("auto", "cuda:0") == "float"
    with pytest.raises(ValueError, match="CPU engine"):
        resolve_weight_format("int4", "cuda:0")
    assert resolve_weight_format("float", "cpu") == "float"
    with pytest.raises(ValueError, match="one of"):
        resolve_weight_format("int2", "cpu")


@pytest.mark.parametrize("value", ["int2", "", 8, None])
def test_bad_weight_format_in_model_toml_names_the_key(value):
    with pytest.raises(ModelLoadFailed) as info:
        LLMOptions.from_section({"weight_format": value})
    assert info.value.param == "llm.weight_format"
    assert "weight_format" in info.value.message


def test_int4_keeps_4_bit_groups_exactly():
    """A matrix that already is 4-bit per group of 32 (as a dequantized GGUF Q4_1 block is:
    w = d * q + m) comes back unchanged up to bfloat16 rounding of d and m."""
    gen = torch.Generator().manual_seed(0)
    o, i = 64, 128
    q = torch.randint(0, 16, (o, i // INT4_GROUP, INT4_GROUP), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15                           # every block spans its full range
    d = torch.rand(o, i // INT4_GROUP, 1, generator=gen).to(torch.bfloat16).float() * 0.1
    m = -torch.rand(o, i // INT4_GROUP, 1, generator=gen).to(torch.bfloat16).float()
    w = (d * q + m).reshape(o, i)
    packed = Int4Weight(w)
    assert float((packed.dequantize() - w).abs().max()) <= 2e-2 * float(w.abs().max())
    x = torch.randn(NARROW_ROWS * 3, i, generator=gen)
    exact = x @ packed.dequantize().t()
    narrow = torch.cat([packed(x[j:j + NARROW_ROWS]) for j in range(0, len(x), NARROW_ROWS)])
    scale = float(exact.abs().max())
    assert float((narrow - exact).abs().max()) < 0.02 * scale       # the int4 kernel
    assert float((packed(x) - exact).abs().max()) < 0.02 * scale     # the bfloat16 GEMM


def test_int4_model_follows_the_float_model_and_is_smaller_than_int8():
    ref = random_model(TINY, seed=3)
    q8, q4 = random_model(TINY, seed=3), random_model(TINY, seed=3)
    q8.quantize("int8")
    q4.quantize("int4")
    assert q4.weight_format == "int4"
    assert isinstance(q4.layers[0].gate_up, Int4Weight)
    assert isinstance(q4.lm_head, Int8Weight), "the head stays int8"
    assert q4.weight_bytes() < q8.weight_bytes()
    for n in (1, 5, 40):
        tokens = prompt(n, seed=n)
        a, b = one_shot(ref, tokens), one_shot(q4, tokens)
        assert _cos(a, b) > 0.99, n
    with pytest.raises(ValueError, match="already int4"):
        q4.quantize("int8")


def test_auto_is_decided_per_matrix_on_cpus_with_fast_bfloat16():
    from engines.llm.quant import cpu_has_fast_bf16
    expected = "auto" if cpu_has_fast_bf16() else "float"
    assert resolve_weight_format("auto", "cpu") == expected
