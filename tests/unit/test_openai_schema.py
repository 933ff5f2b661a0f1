"""OpenAI request validation: every bad field is a 400 naming the field, with a stable code."""
from __future__ import annotations

import pytest

from daemon.errors import InvalidInput
from engines.llm.sampling import SamplingParams
from frontends.http.openai_schema import (MAX_N, parse_chat, parse_completion,
                                          parse_embeddings)

pytestmark = pytest.mark.timeout(30)

USER = [{"role": "user", "content": "hi"}]


def chat(**kw):
    return parse_chat({"model": "m", "messages": USER, **kw})


def test_chat_defaults_and_content_forms():
    req = parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                      "text": "b"}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "c", "name": "bob"}]})
    assert req.model == "m"
    assert req.messages == [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": "ab"},
                            {"role": "assistant", "content": ""},
                            {"role": "user", "content": "c"}]
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.stop, p.stream) == \
        (None, 1.0, 1.0, 1, [], False)


def test_chat_sampling_fields_and_extensions():
    p = chat(max_tokens=5, temperature=0, top_p=0.5, top_k=4, min_p=0.1,
             repetition_penalty=1.2, presence_penalty=-1, frequency_penalty=2, seed=-1, n=3,
             stop=["\n", "END", "\n"], logprobs=True, top_logprobs=0, user="u1",
             stream=True, stream_options={"include_usage": True}, ignore_eos=True,
             stop_token_ids=[5]).params
    assert (p.max_tokens, p.temperature, p.top_k, p.min_p, p.n) == (5, 0.0, 4, 0.1, 3)
    assert p.stop == ["\n", "END"]            # duplicates dropped, order kept
    assert p.logprobs and p.include_usage and p.stream and p.ignore_eos
    assert p.user == "u1" and p.stop_token_ids == [5]


def test_max_completion_tokens_wins_over_max_tokens():
    assert chat(max_tokens=9, max_completion_tokens=3).params.max_tokens == 3


def test_engine_params_are_valid_sampling_params_with_distinct_seeds():
    p = chat(seed=2**64 - 1, n=2, temperature=0.7, stop_token_ids=[3]).params
    e0, e1 = p.engine_params(16, 0), p.engine_params(16, 1)
    for e in (e0, e1):
        SamplingParams(**e).validate(vocab_size=100)      # the engine accepts them as they are
    assert e0["seed"] != e1["seed"] and 0 <= e0["seed"] < 2**63
    assert e0["max_tokens"] == 16 and e0["stop_token_ids"] == [3]
    assert chat().params.engine_params(4, 0)["seed"] is None
    # min_tokens travels to the engine, never above the max_tokens the choice gets
    p = chat(min_tokens=6).params
    assert p.engine_params(16, 0)["min_tokens"] == 6 and p.engine_params(4, 0)["min_tokens"] == 4
    SamplingParams(**p.engine_params(4, 0)).validate(vocab_size=100)


BAD_CHAT = [
    ({"messages": USER}, "model", "missing_parameter"),
    ({"model": 5, "messages": USER}, "model", "invalid_parameter"),
    ({"model": "m"}, "messages", "missing_parameter"),
    ({"model": "m", "messages": []}, "messages", "empty_messages"),
    ({"model": "m", "messages": "hi"}, "messages", "invalid_parameter"),
    ({"model": "m", "messages": ["hi"]}, "messages[0]", "invalid_parameter"),
    ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role", "missing_parameter"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role",
     "invalid_parameter"),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role",
     "unsupported_parameter"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content",
     "missing_parameter"),
    ({"model": "m", "messages": [{"role": "user", "content": 3}]}, "messages[0].content",
     "invalid_parameter"),
    ({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0].type",
     "unsupported_parameter"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content[0].text", "invalid_parameter"),
    ({"model": "m", "messages": USER, "n": MAX_N + 1}, "n", "invalid_parameter"),
    ({"model": "m", "messages": USER, "n": 0}, "n", "invalid_parameter"),
    ({"model": "m", "messages": USER, "n": 1.5}, "n", "invalid_parameter"),
    ({"model": "m", "messages": USER, "max_tokens": 0}, "max_tokens", "invalid_parameter"),
    ({"model": "m", "messages": USER, "max_tokens": True}, "max_tokens", "invalid_parameter"),
    ({"model": "m", "messages": USER, "max_completion_tokens": "5"}, "max_completion_tokens",
     "invalid_parameter"),
    ({"model": "m", "messages": USER, "temperature": 2.5}, "temperature", "invalid_parameter"),
    ({"model": "m", "messages": USER, "temperature": "hot"}, "temperature",
     "invalid_parameter"),
    ({"model": "m", "messages": USER, "top_p": 0}, "top_p", "invalid_parameter"),
    ({"model": "m", "messages": USER, "presence_penalty": 3}, "presence_penalty",
     "invalid_parameter"),
    ({"model": "m", "messages": USER, "frequency_penalty": float("nan")}, "frequency_penalty",
     "invalid_parameter"),
    ({"model": "m", "messages": USER, "top_k": -2}, "top_k", "invalid_parameter"),
    ({"model": "m", "messages": USER, "min_p": 1.5}, "min_p", "invalid_parameter"),
    ({"model": "m", "messages": USER, "repetition_penalty": 0}, "repetition_penalty",
     "invalid_parameter"),
    ({"model": "m", "messages": USER, "seed": "1"}, "seed", "invalid_parameter"),
    ({"model": "m", "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop",
     "invalid_parameter"),
    ({"model": "m", "messages": USER, "stop": [""]}, "stop", "invalid_parameter"),
    ({"model": "m", "messages": USER, "stop": 7}, "stop", "invalid_parameter"),
    ({"model": "m", "messages": USER, "stream": "yes"}, "stream", "invalid_parameter"),
    ({"model": "m", "messages": USER, "stream_options": {"include_usage": True}},
     "stream_options", "invalid_parameter"),
    ({"model": "m", "messages": USER, "stream": True,
      "stream_options": {"include_usage": 1}}, "stream_options.include_usage",
     "invalid_parameter"),
    ({"model": "m", "messages": USER, "logprobs": 1}, "logprobs", "invalid_parameter"),
    ({"model": "m", "messages": USER, "top_logprobs": 3}, "top_logprobs",
     "invalid_parameter"),                                   # needs logprobs: true
    ({"model": "m", "messages": USER, "top_logprobs": 50}, "top_logprobs",
     "invalid_parameter"),
    ({"model": "m", "messages": USER, "tools": [{"type": "function"}]}, "tools",
     "unsupported_parameter"),
    ({"model": "m", "messages": USER, "response_format": {"type": "xml"}},
     "response_format.type", "invalid_parameter"),
    ({"model": "m", "messages": USER, "response_format": {"type": "json_schema"}},
     "response_format.json_schema", "missing_parameter"),
    ({"model": "m", "messages": USER, "response_format": {"type": "json_object"},
      "guided_regex": "a+"}, "guided_regex", "invalid_parameter"),
    ({"model": "m", "messages": USER, "logit_bias": {"5": 10}}, "logit_bias",
     "unsupported_parameter"),
    ({"model": "m", "messages": USER, "stop_token_ids": [-1]}, "stop_token_ids",
     "invalid_parameter"),
    ({"model": "m", "messages": USER, "user": 5}, "user", "invalid_parameter"),
]


@pytest.mark.parametrize("body,param,code", BAD_CHAT, ids=[f"{p}-{c}" for _, p, c in BAD_CHAT])
def test_bad_chat_fields_name_the_field(body, param, code):
    with pytest.raises(InvalidInput) as err:
        parse_chat(body)
    assert (err.value.param, err.value.code, err.value.status) == (param, code, 400)
    assert param.split("[")[0].split(".")[0] in err.value.message


@pytest.mark.parametrize("body", [[], "x", 3, None])
def test_body_must_be_an_object(body):
    with pytest.raises(InvalidInput) as err:
        parse_chat(body)
    assert err.value.code == "invalid_json"


def test_neutral_values_of_unsupported_fields_are_accepted():
    req = chat(logit_bias={}, response_format={"type": "text"}, tools=[], top_logprobs=0,
               best_of=1, parallel_tool_calls=False, some_future_field=1)
    assert req.params.n == 1


def test_completion_prompt_forms():
    assert parse_completion({"model": "m", "prompt": "a"}).prompts == ["a"]
    assert parse_completion({"model": "m", "prompt": ["a", "b"]}).prompts == ["a", "b"]
    assert parse_completion({"model": "m", "prompt": [1, 2]}).prompts == [[1, 2]]
    assert parse_completion({"model": "m", "prompt": [[1], [2, 3]]}).prompts == [[1], [2, 3]]
    req = parse_completion({"model": "m", "prompt": "a", "echo": True, "logprobs": 0})
    assert req.echo and req.params.logprobs


BAD_COMPLETION = [
    ({"model": "m"}, "prompt", "missing_parameter"),
    ({"model": "m", "prompt": []}, "prompt", "invalid_parameter"),
    ({"model": "m", "prompt": [1, "a"]}, "prompt", "invalid_parameter"),
    ({"model": "m", "prompt": [[1], []]}, "prompt", "invalid_parameter"),
    ({"model": "m", "prompt": [[1], ["a"]]}, "prompt[1]", "invalid_parameter"),
    ({"model": "m", "prompt": ["a"] * 33}, "prompt", "invalid_parameter"),
    ({"model": "m", "prompt": "a", "logprobs": 9}, "logprobs", "invalid_parameter"),
    ({"model": "m", "prompt": "a", "suffix": "z"}, "suffix", "unsupported_parameter"),
    ({"model": "m", "prompt": "a", "best_of": 3}, "best_of", "unsupported_parameter"),
    ({"model": "m", "prompt": "a", "echo": "no"}, "echo", "invalid_parameter"),
    ({"model": "m", "prompt": "a", "min_tokens": -1}, "min_tokens", "invalid_parameter"),
    ({"model": "m", "prompt": "a", "min_tokens": "3"}, "min_tokens", "invalid_parameter"),
    ({"model": "m", "prompt": "a", "min_tokens": 2.5}, "min_tokens", "invalid_parameter"),
    ({"model": "m", "prompt": "a", "max_tokens": 4, "min_tokens": 5}, "min_tokens",
     "invalid_parameter"),
]


@pytest.mark.parametrize("body,param,code", BAD_COMPLETION,
                         ids=[f"{p}-{c}" for _, p, c in BAD_COMPLETION])
def test_bad_completion_fields(body, param, code):
    with pytest.raises(InvalidInput) as err:
        parse_completion(body)
    assert (err.value.param, err.value.code) == (param, code)


def test_embedding_input_forms():
    assert parse_embeddings({"model": "e", "input": "a"}).inputs == ["a"]
    req = parse_embeddings({"model": "e", "input": ["a", ""], "encoding_format": "base64",
                            "dimensions": 384})
    assert req.inputs == ["a", ""] and req.encoding_format == "base64"
    assert req.dimensions == 384
    assert parse_embeddings({"model": "e", "input": [1, 2]}).inputs == [[1, 2]]
    assert parse_embeddings({"model": "e", "input": [[1], [2]]}).inputs == [[1], [2]]


BAD_EMBEDDINGS = [
    ({"input": "a"}, "model", "missing_parameter"),
    ({"model": "e"}, "input", "missing_parameter"),
    ({"model": "e", "input": []}, "input", "invalid_parameter"),
    ({"model": "e", "input": 5}, "input", "invalid_parameter"),
    ({"model": "e", "input": [[1], []]}, "input", "invalid_parameter"),
    ({"model": "e", "input": ["a"] * 2049}, "input", "invalid_parameter"),
    ({"model": "e", "input": "a", "encoding_format": "int8"}, "encoding_format",
     "invalid_parameter"),
    ({"model": "e", "input": "a", "dimensions": "x"}, "dimensions", "invalid_parameter"),
]


@pytest.mark.parametrize("body,param,code", BAD_EMBEDDINGS,
                         ids=[f"{p}-{c}" for _, p, c in BAD_EMBEDDINGS])
def test_bad_embedding_fields(body, param, code):
    with pytest.raises(InvalidInput) as err:
        parse_embeddings(body)
    assert (err.value.param, err.value.code) == (param, code)


def test_unknown_parameters_are_ignored_and_logged_once_per_name(caplog):
    import frontends.http.openai_schema as schema
    schema._NOTED.clear()
    caplog.set_level("INFO", logger="frontends.http.openai_schema")
    body = {"model": "m", "messages": USER, "store": True, "metadata": {"a": "b"},
            "temperature": 0.5}
    for _ in range(3):
        assert parse_chat(body).params.temperature == 0.5     # still served
    parse_completion({"model": "m", "prompt": "x", "store": True})
    noted = [r.getMessage() for r in caplog.records]
    assert len(noted) == 3, noted          # store and metadata for chat, store for completions
    assert sum("'store'" in m for m in noted) == 2 and any("'metadata'" in m for m in noted)
    # Known fields are never reported; a flood of random names stops being remembered.
    assert not any("temperature" in m or "'model'" in m for m in noted)
    parse_chat({"model": "m", "messages": USER, **{f"k{i}": 1 for i in range(1000)}})
    assert len(schema._NOTED) == schema._MAX_NOTED
    schema._NOTED.clear()


def test_top_logprobs_reach_the_engine():
    chat = parse_chat({"model": "m", "messages": USER, "logprobs": True, "top_logprobs": 5})
    assert chat.params.engine_params(8, 0)["top_logprobs"] == 5
    comp = parse_completion({"model": "m", "prompt": "a", "logprobs": 3})
    engine = comp.params.engine_params(8, 0)
    assert engine["logprobs"] is True and engine["top_logprobs"] == 3
    SamplingParams(**engine).validate(100)
    with pytest.raises(InvalidInput) as err:
        SamplingParams(top_logprobs=21).validate(100)
    assert err.value.param == "top_logprobs"
