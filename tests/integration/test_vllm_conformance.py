"""The OpenAI side as vLLM serves it, through the `openai` package and plain HTTP: the chat
stream's role rides on the first generated content, `tool_choice` needs `tools`, vLLM's
`/tokenize`, `/detokenize` and `/health`. One daemon serving SmolLM2, shared by the module."""
from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon, http_get, orphan_segments, request_json

pytestmark = pytest.mark.timeout(60)

CHAT = [{"role": "user", "content": "Name three colours."}]
ENV = {"FERRY_TORCH_THREADS": "1"}      # see test_openai.py: one torch thread on 2 cores


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, ("smollm2",)), env=ENV).start()
    yield d
    assert d.stop() == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def _post(ferry, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(ferry.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return request_json(req, 50.0)


# -- chat stream -------------------------------------------------------------------------------

def test_chat_stream_sends_the_role_with_the_first_content(client):
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=CHAT, stream=True, temperature=0, max_tokens=6, n=2))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        first = mine[0].delta
        # the first chunk of a choice carries generated text: a client stamping time to
        # first token on it measures the first token, not the request's arrival
        assert first.role == "assistant" and first.content, first
        assert all(c.delta.role is None for c in mine[1:])
        assert mine[-1].finish_reason in ("stop", "length")


def test_streamed_text_is_unchanged_by_where_the_role_rides(client):
    whole = client.chat.completions.create(model="smollm2", messages=CHAT, temperature=0,
                                           max_tokens=8)
    chunks = client.chat.completions.create(model="smollm2", messages=CHAT, temperature=0,
                                            max_tokens=8, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


# -- tool_choice -------------------------------------------------------------------------------

@pytest.mark.parametrize("choice", ["auto", "required",
                                    {"type": "function", "function": {"name": "f"}}])
def test_tool_choice_without_tools_is_a_400(client, choice):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=1,
                                       tool_choice=choice)
    assert err.value.body["code"] == "invalid_parameter"
    assert err.value.body["param"] == "tool_choice"


def test_tool_choice_none_without_tools_is_accepted(client):
    out = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=1,
                                         tool_choice="none")
    assert out.choices[0].message.role == "assistant"


# -- /tokenize, /detokenize ----------------------------------------------------------------------

def test_tokenize_and_detokenize_round_trip(ferry, client):
    code, tok = _post(ferry, "/tokenize", {"model": "smollm2", "prompt": "Hello, Ferry!",
                                           "return_token_strs": True})
    assert code == 200, tok
    assert tok["count"] == len(tok["tokens"]) > 0
    assert len(tok["token_strs"]) == tok["count"]
    card = client.models.retrieve("smollm2")
    assert tok["max_model_len"] == card.max_model_len
    code, back = _post(ferry, "/detokenize", {"model": "smollm2", "tokens": tok["tokens"]})
    assert code == 200 and back["prompt"].endswith("Hello, Ferry!")
    # the same prompt as a completion counts the same tokens (model left out: the only LLM)
    code, plain = _post(ferry, "/tokenize", {"prompt": "Hello, Ferry!",
                                             "add_special_tokens": False})
    used = client.completions.create(model="smollm2", prompt="Hello, Ferry!", max_tokens=1)
    assert code == 200 and plain["count"] == used.usage.prompt_tokens
    assert plain["token_strs"] is None


def test_a_long_detokenize_is_decoded_off_the_event_loop_and_is_exact(ferry):
    code, tok = _post(ferry, "/tokenize", {"model": "smollm2", "prompt": "Hello, Ferry!",
                                           "add_special_tokens": False})
    assert code == 200, tok
    many = tok["tokens"] * 2000                    # well past the inline limit
    code, back = _post(ferry, "/detokenize", {"model": "smollm2", "tokens": many})
    assert code == 200 and back["prompt"] == "Hello, Ferry!" * 2000


def test_tokenize_chat_counts_what_a_chat_completion_counts(ferry, client):
    code, tok = _post(ferry, "/tokenize", {"model": "smollm2", "messages": CHAT})
    assert code == 200, tok
    used = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=1)
    assert tok["count"] == used.usage.prompt_tokens
    code, bare = _post(ferry, "/tokenize", {"model": "smollm2", "messages": CHAT,
                                            "add_generation_prompt": False})
    assert code == 200 and bare["count"] < tok["count"]
    assert tok["tokens"][:bare["count"]] == bare["tokens"]


@pytest.mark.parametrize("path, body, status, code", [
    ("/tokenize", {"model": "smollm2"}, 400, "missing_parameter"),
    ("/tokenize", {"model": "smollm2", "prompt": "x", "messages": CHAT}, 400,
     "invalid_parameter"),
    ("/tokenize", {"model": "smollm2", "prompt": 7}, 400, "invalid_parameter"),
    ("/tokenize", {"model": "smollm2", "prompt": "x", "add_special_tokens": "yes"}, 400,
     "invalid_parameter"),
    ("/tokenize", {"model": "smollm2", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "invalid_parameter"),
    ("/tokenize", {"model": "smollm2", "messages": CHAT, "continue_final_message": True}, 400,
     "unsupported_parameter"),
    ("/tokenize", {"model": "smollm2", "messages": CHAT, "chat_template": "{{ x }}"}, 400,
     "unsupported_parameter"),
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model_not_found"),
    ("/tokenize", {"model": 5, "prompt": "x"}, 400, "invalid_parameter"),
    ("/detokenize", {"model": "smollm2"}, 400, "missing_parameter"),
    ("/detokenize", {"model": "smollm2", "tokens": [1, "a"]}, 400, "invalid_parameter"),
    ("/detokenize", {"model": "smollm2", "tokens": [10**9]}, 400, "invalid_parameter"),
    ("/detokenize", {"model": "smollm2", "tokens": [-1]}, 400, "invalid_parameter"),
])
def test_bad_tokenize_requests_are_clear_errors(ferry, path, body, status, code):
    got, answer = _post(ferry, path, body)
    assert (got, answer["error"]["code"]) == (status, code), answer


def test_tokenize_body_must_be_json(ferry):
    req = urllib.request.Request(ferry.url + "/tokenize", data=b"prompt=x",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert request_json(req, 10.0)[0] == 415


# -- /health -----------------------------------------------------------------------------------

def test_health_alias_answers_200_when_ready(ferry):
    with urllib.request.urlopen(ferry.url + "/health", timeout=5) as resp:
        assert resp.status == 200 and resp.read() == b""
    assert http_get(ferry.url + "/readyz")[0] == 200


def test_triton_statistics_refuse_an_llm_by_name(ferry):
    code, body = http_get(ferry.url + "/v2/models/smollm2/stats")
    assert (code, body["code"]) == (400, "statistics_unsupported")
    code, body = http_get(ferry.url + "/v2/models/stats")
    assert code == 200 and body == {"model_stats": []}
