"""Deterministic mode: a request's tokens and logprobs do not depend on batch company, on prefill
chunking or on prefix-cache hits, whether the model runs with `[llm] deterministic = true` or
the request asks for it alone (SamplingParams.deterministic). Greedy and seeded requests, on a
tiny random Llama with int4 (and int8, float) weights, compared bit for bit.
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from daemon.errors import InvalidInput
from engines.base import GenerateRequest
from engines.llm.config import ModelLoadFailed
from engines.llm.engine import LLMOptions
from engines.llm.model import random_model
from engines.llm.quant import DETERMINISTIC_ROWS, Int4Weight, Int8Weight, fixed_rows
from engines.llm.sampling import SamplingParams
from tests.unit.test_llm_engine import CFG, drain, make_engine

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=True)
SEEDED = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True,
                        logprobs=True)


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, CFG.vocab_size - 1) for _ in range(n)]


TARGET = _prompt(42, seed=1)       # > NARROW_ROWS: the default mode's wide (bfloat16) path


def _others(n: int) -> dict[str, tuple[list[int], SamplingParams]]:
    return {f"o{i}": (_prompt(5 + 3 * i, seed=10 + i),
                      SamplingParams(max_tokens=6 + i % 4, temperature=0.0 if i % 2 else 1.0,
                                     seed=i if i % 3 else None, ignore_eos=True))
            for i in range(n)}


def _run(engine, requests) -> dict[str, tuple[list[int], list[float]]]:
    for rid, (prompt, params) in requests.items():
        engine.submit(GenerateRequest(rid, prompt, params))
    outs = drain(engine)
    return {rid: ([t for o in outs[rid] for t in o.token_ids],
                  [lp for o in outs[rid] for lp in (o.logprobs or [])]) for rid in requests}


def _scenarios(model, params: SamplingParams, **opts) -> list[tuple[list[int], list[float]]]:
    """The target request alone; beside 10 others; chunked (8 tokens a step) beside 3; and
    after the same prompt was served (its prefix now cached)."""
    results = [_run(make_engine(model, **opts), {"t": (TARGET, params)})["t"],
               _run(make_engine(model, **opts), {**_others(10), "t": (TARGET, params)})["t"]]
    chunked = make_engine(model, max_num_seqs=4, max_batched_tokens=8, **opts)
    results.append(_run(chunked, {**_others(3), "t": (TARGET, params)})["t"])
    engine = make_engine(model, **opts)
    _run(engine, {"first": (TARGET, dataclasses.replace(params, seed=99))})
    engine.submit(GenerateRequest("t", TARGET, params))
    outs = drain(engine)["t"]
    assert outs[0].cached_tokens >= 32, "the second request hits the prefix cache"
    results.append(([t for o in outs for t in o.token_ids],
                    [lp for o in outs for lp in o.logprobs]))
    return results


@pytest.fixture(scope="module", params=["int4", "int8", "float"])
def model(request):
    m = random_model(CFG, seed=0)
    if request.param != "float":
        if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
            pytest.skip("no int8/int4 kernels in this torch")
        m.quantize(request.param)
    return m


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_model_wide_deterministic_mode_is_batch_and_cache_invariant(model, params):
    results = _scenarios(model, params, deterministic=True)
    assert all(r == results[0] for r in results[1:]), [r[0] for r in results]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_request_can_ask_for_it_alone(model, params):
    results = _scenarios(model, dataclasses.replace(params, deterministic=True))
    assert all(r == results[0] for r in results[1:]), [r[0] for r in results]


def test_default_mode_is_not_bit_invariant_with_int4(model):
    """What the mode buys: by default a cache hit recomputes the prompt's tail on the int4
    kernel where the miss used the bfloat16 GEMM, so logprobs differ in their last bits."""
    if model.weight_format != "int4":
        pytest.skip("the float path's differences are smaller and not certain")
    results = _scenarios(model, GREEDY)
    assert results[0][1] != results[3][1]


def test_fixed_rows_products_do_not_depend_on_the_other_rows():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=gen) * 0.05
    x = torch.randn(3 * DETERMINISTIC_ROWS + 5, 128, generator=gen)
    for weight in (w, Int8Weight(w), Int4Weight(w), Int8Weight(w, keep_wide=False)):
        alone = torch.cat([fixed_rows(x[i:i + 1], weight) for i in range(len(x))])
        for n in (2, DETERMINISTIC_ROWS, DETERMINISTIC_ROWS + 1, len(x)):
            assert torch.equal(fixed_rows(x[:n], weight), alone[:n]), (type(weight), n)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_deterministic_values_are_refused(value):
    with pytest.raises(ModelLoadFailed) as info:
        LLMOptions.from_section({"deterministic": value})
    assert info.value.param == "llm.deterministic"
    with pytest.raises(InvalidInput) as bad:
        SamplingParams(deterministic=value).validate()
    assert bad.value.param == "deterministic"
