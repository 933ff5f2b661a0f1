"""Tool calling through /v1/chat/completions with the `openai` package unchanged, against a
real daemon serving SmolLM2 (whose template knows no tools: Ferry's Hermes-style fallback):
tool_choice "required" and a named function always give calls that parse and whose arguments
validate, streamed calls assemble to the same, a second turn with the tool's result is
answered, "auto" and "none", and bad forms are 400s naming the field. The same weights behind
a Llama-3-style template (model.toml [llm] chat_template, which renders `tools` itself) answer
calls in Llama 3's JSON format."""
from __future__ import annotations

import json
import urllib.request

import jsonschema
import openai
import pytest

from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon, orphan_segments
from tests.unit.test_tools import LLAMA3_TEMPLATE

pytestmark = pytest.mark.timeout(60)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                   "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}}}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    repo = tensor_repo(demo_models, tmp_path_factory, names=("smollm2",))
    llama = repo / "llama3ish" / "1"            # SmolLM2's weights, a Llama-3-style template
    llama.mkdir(parents=True)
    gguf = next((demo_models / "smollm2").rglob("*.gguf"))
    (llama / gguf.name).symlink_to(gguf.resolve())
    (llama / "model.toml").write_text(
        f'engine = "llm"\nweights = "{gguf.name}"\n\n[llm]\nkv_cache_mb = 32\n'
        f'max_num_seqs = 4\nchat_template = {json.dumps(LLAMA3_TEMPLATE)}\n')
    d = Daemon(repo, workers=1, env={"FERRY_TORCH_THREADS": "1"}).start()
    yield d
    assert d.stop() == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def check_calls(calls, names=tuple(SCHEMAS)):
    assert calls, "no tool calls"
    ids = set()
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        ids.add(call.id)
    assert len(ids) == len(calls)


@pytest.mark.parametrize("parallel", [False, None])
def test_required_gives_calls_that_validate(client, parallel):
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    r = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS,
                                       tool_choice="required", max_tokens=80, temperature=0,
                                       **extra)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    check_calls(choice.message.tool_calls)
    if parallel is False:
        assert len(choice.message.tool_calls) == 1


@pytest.mark.parametrize("name", ["get_weather", "get_time"])
def test_a_named_function_is_the_one_called(client, name):
    r = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": name}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls] == [name]
    check_calls(choice.message.tool_calls, (name,))


def test_a_streamed_call_assembles_to_the_whole(client):
    kw = dict(model="smollm2", messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    reasons, content, pieces = [], "", 0
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or ():
                slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    assert slot["id"] is None, "a call's id comes once"
                    slot["id"] = tc.id
                    assert tc.type == "function"
                if tc.function.name:
                    slot["name"] += tc.function.name
                if tc.function.arguments:
                    slot["arguments"] += tc.function.arguments
                    pieces += 1
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert reasons == ["tool_calls"] and not content
    assert [(s["name"], s["arguments"]) for s in calls.values()] == \
        [(w.function.name, w.function.arguments) for w in whole]
    assert calls[0]["id"].startswith("call_")
    assert pieces > 1, "the arguments should stream in pieces"
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS["get_weather"])


def test_the_stream_helper_collects_the_call(client):
    with client.beta.chat.completions.stream(
            model="smollm2", messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
            tool_choice="required", parallel_tool_calls=False) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message.tool_calls)


def test_a_second_turn_with_the_result_is_answered(client):
    first = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    msg = first.choices[0].message
    call = msg.tool_calls[0]
    turns = ASK + [msg.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    r = client.chat.completions.create(model="smollm2", messages=turns, tools=TOOLS,
                                       tool_choice="none", max_tokens=24, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.content and not choice.message.tool_calls
    # and with the tools still on offer ("auto"), the turn is answered too
    r = client.chat.completions.create(model="smollm2", messages=turns, tools=TOOLS,
                                       max_tokens=24, temperature=0)
    choice = r.choices[0]
    assert choice.message.content or choice.message.tool_calls
    if choice.message.tool_calls:
        check_calls(choice.message.tool_calls)
        assert choice.finish_reason == "tool_calls"


def test_auto_answers_text_or_calls_that_validate(client):
    r = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS,
                                       tool_choice="auto", max_tokens=60, temperature=0)
    choice = r.choices[0]
    if choice.message.tool_calls:
        check_calls(choice.message.tool_calls)
    else:
        assert choice.message.content and "<tool_call>" not in choice.message.content


def test_a_template_that_renders_tools_gets_calls_in_its_format(ferry, client):
    req = urllib.request.Request(ferry.url + "/tokenize", method="POST",
                                 data=json.dumps({"model": "llama3ish", "messages": ASK,
                                                  "return_token_strs": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        plain = json.loads(resp.read())
    assert "start_header" in "".join(plain["token_strs"])     # the model.toml template
    r = client.chat.completions.create(model="llama3ish", messages=ASK, tools=TOOLS,
                                       tool_choice="required", max_tokens=60, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_calls(choice.message.tool_calls)
    assert len(choice.message.tool_calls) == 1           # Llama 3 JSON: one call
    # the template rendered the tools (Environment: ipython, the definitions as JSON)
    assert r.usage.prompt_tokens > plain["count"] + 60


BAD = [
    ({"tools": {"type": "function"}}, "tools", "invalid_parameter"),
    ({"tools": [{"type": "function", "function": {"description": "x"}}]},
     "tools[0].function.name", "missing_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
     "tools[0].function.parameters", "invalid_parameter"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "invalid_parameter"),
    ({"tools": TOOLS, "messages": ASK + [{"role": "tool", "content": "18 C"}]},
     "messages[1].tool_call_id", "missing_parameter"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice", "invalid_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}}}],
      "tool_choice": "required"}, "tools", "invalid_grammar"),
]


@pytest.mark.parametrize("extra,param,code", BAD, ids=[f"{p}-{c}" for _, p, c in BAD])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_tool_forms_are_400(client, extra, param, code, stream):
    body = {"model": "smollm2", "messages": ASK, "max_tokens": 4, "stream": stream, **extra}
    with pytest.raises(openai.BadRequestError) as err:
        r = client.post("/chat/completions", body=body, cast_to=object, stream=stream,
                        stream_cls=openai.Stream[object])
        if stream:
            list(r)
    assert err.value.status_code == 400
    assert (err.value.body["param"], err.value.body["code"]) == (param, code), err.value.body
