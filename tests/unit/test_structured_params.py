"""Reading output constraints from chat/completion bodies: OpenAI's response_format, vLLM's
structured_outputs and guided_* fields, each into the engine's `structured` spec; every bad
form a 400 naming its field."""
from __future__ import annotations

import pytest

from daemon.errors import InvalidInput
from frontends.http.openai_schema import parse_chat, parse_completion
from frontends.http.structured import parse_structured

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("body,spec", [
    ({}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, {"type": "json_object"}),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     {"type": "json_schema", "schema": SCHEMA}),
    ({"guided_json": SCHEMA}, {"type": "json_schema", "schema": SCHEMA}),
    ({"guided_json": '{"type": "object"}'}, {"type": "json_schema",
                                             "schema": {"type": "object"}}),
    ({"guided_regex": "[a-z]+"}, {"type": "regex", "pattern": "[a-z]+"}),
    ({"guided_choice": ["yes", "no"]}, {"type": "choice", "choices": ["yes", "no"]}),
    ({"guided_grammar": 'root ::= "a"'}, {"type": "grammar", "grammar": 'root ::= "a"'}),
    ({"structured_outputs": {"choice": ["a", "b"], "disable_fallback": True}},
     {"type": "choice", "choices": ["a", "b"]}),
    ({"structured_outputs": {"json_object": True}}, {"type": "json_object"}),
    ({"structured_outputs": {"json": SCHEMA, "regex": None}},
     {"type": "json_schema", "schema": SCHEMA}),
])
def test_constraints_are_read_into_the_engine_spec(body, spec):
    assert parse_structured(body) == spec


@pytest.mark.parametrize("body,param,code", [
    ({"response_format": "json"}, "response_format", "invalid_parameter"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "invalid_parameter"),
    ({"response_format": {"type": "json_schema", "json_schema": []}},
     "response_format.json_schema", "invalid_parameter"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "{"}}},
     "response_format.json_schema.schema", "invalid_parameter"),
    ({"guided_json": 5}, "guided_json", "invalid_parameter"),
    ({"guided_regex": ""}, "guided_regex", "invalid_parameter"),
    ({"guided_choice": []}, "guided_choice", "invalid_parameter"),
    ({"guided_choice": ["a", 1]}, "guided_choice", "invalid_parameter"),
    ({"guided_grammar": "  "}, "guided_grammar", "invalid_parameter"),
    ({"structured_outputs": []}, "structured_outputs", "invalid_parameter"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag",
     "unsupported_parameter"),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object",
     "invalid_parameter"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice",
     "invalid_parameter"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "invalid_parameter"),
])
def test_bad_constraints_name_their_field(body, param, code):
    with pytest.raises(InvalidInput) as err:
        parse_structured(body)
    assert (err.value.param, err.value.code, err.value.status) == (param, code, 400)


def test_chat_and_completions_pass_the_constraint_to_the_engine():
    chat = parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                       "response_format": {"type": "json_object"}})
    assert chat.params.engine_params(8, 0)["structured"] == {"type": "json_object"}
    comp = parse_completion({"model": "m", "prompt": "x", "guided_regex": "[0-9]+"})
    assert comp.params.engine_params(8, 0)["structured"] == {"type": "regex",
                                                             "pattern": "[0-9]+"}
    plain = parse_completion({"model": "m", "prompt": "x"})
    assert plain.params.engine_params(8, 0)["structured"] is None


@pytest.mark.parametrize("body,param", [
    ({"guided_regex": "("}, "guided_regex"),
    ({"guided_grammar": "root ::= missing"}, "guided_grammar"),
    ({"structured_outputs": {"json": {"type": "no-such-type"}}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"schema": {"type": "object", "minProperties": "x"}}}},
     "response_format"),
])
def test_constraints_that_do_not_compile_are_invalid_grammar(body, param):
    with pytest.raises(InvalidInput) as err:
        parse_structured(body)
    assert (err.value.param, err.value.code, err.value.status) == (param, "invalid_grammar", 400)


def test_the_http_worker_side_imports_no_torch():
    import subprocess
    import sys
    code = ("import sys, frontends.http.structured as s; "
            "s.parse_structured({'guided_regex': 'a+'}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
