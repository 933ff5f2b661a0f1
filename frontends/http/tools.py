"""Tool calling on /v1/chat/completions: the `tools` and `tool_choice` fields, the tools rendered
into the prompt, and the grammar that enforces a required call (the calls are parsed out of the
generated text by frontends/http/tool_calls.py).

Rendering follows the model's chat template: a template that reads `tools` (Llama 3.1, Qwen,
Hermes) gets them as HF passes them, with assistant `tool_calls` (arguments as objects) and
`role: "tool"` messages as they are. A template that does not (SmolLM2's) gets a Hermes-style
system prompt listing the tools, earlier calls written as `<tool_call>{json}</tool_call>` text
and tool results as user turns in `<tool_response>` tags, so any template renders them.

The call format is the template's: Hermes `<tool_call>` tags, or Llama 3's bare JSON for
templates speaking `ipython`. `tool_choice` "required" or a named function constrains the
output with a Lark grammar (engines/llm/grammar.py) whose JSON is an anyOf over the tools'
`{"name": const, "arguments": parameters}`, so the call always parses and its arguments
validate; "auto" generates freely and parses calls the model chose to write; "none"
neither renders nor parses tools.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from daemon.errors import InvalidInput
from frontends.http.tool_calls import HERMES, LLAMA3, ToolCallParser, ToolFormat, call_id_new

__all__ = ["Tool", "ToolRequest", "MAX_TOOLS", "parse_tools", "read_tool_calls",
           "pick_format", "render_messages", "constraint"]

MAX_TOOLS = 128                       # as OpenAI
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CHOICES = ("none", "auto", "required")


def _bad(param: str, why: str, code: str = "invalid_parameter") -> InvalidInput:
    return InvalidInput(f"'{param}' {why}", code=code, param=param)


# -- the request fields ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        """The definition as OpenAI and HF chat templates spell it."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            fn["description"] = self.description
        fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """The tools a chat request offers and what it asks of them."""

    tools: tuple[Tool, ...]
    choice: str                       # "auto" | "required" | "function"
    named: str | None = None          # the function tool_choice names
    parallel: bool = True             # parallel_tool_calls

    @property
    def offered(self) -> tuple[Tool, ...]:
        """The tools a call may name."""
        return tuple(t for t in self.tools if self.named in (None, t.name))

    def parser(self, fmt: ToolFormat) -> ToolCallParser:
        """A parser for one choice's output."""
        return ToolCallParser(fmt, {t.name for t in self.offered})


def _tool(v: Any, where: str) -> Tool:
    if not isinstance(v, dict):
        raise _bad(where, "must be an object {\"type\": \"function\", \"function\": {...}}")
    if v.get("type", "function") != "function":
        raise _bad(f"{where}.type", f"must be 'function', got {v.get('type')!r}")
    fn = v.get("function")
    if fn is None:
        raise _bad(f"{where}.function", "is required", "missing_parameter")
    if not isinstance(fn, dict):
        raise _bad(f"{where}.function", "must be an object with a 'name'")
    name = fn.get("name")
    if name is None:
        raise _bad(f"{where}.function.name", "is required", "missing_parameter")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _bad(f"{where}.function.name", "must be 1 to 64 letters, digits, '_', '.' or "
                   f"'-', got {name!r}")
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise _bad(f"{where}.function.description", "must be a string")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise _bad(f"{where}.function.parameters", "must be a JSON schema object")
    if fn.get("strict") is not None and not isinstance(fn.get("strict"), bool):
        raise _bad(f"{where}.function.strict", "must be a boolean")
    return Tool(name, desc, params)


def _choice(v: Any, names: set[str]) -> tuple[str, str | None]:
    if v is None:
        return "auto", None
    if isinstance(v, str):
        if v not in _CHOICES:
            raise _bad("tool_choice", "must be 'none', 'auto', 'required' or "
                       f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {v!r}")
        return v, None
    if not isinstance(v, dict) or v.get("type") != "function":
        raise _bad("tool_choice", "must be a string or {\"type\": \"function\", ...}")
    fn = v.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if name is None:
        raise _bad("tool_choice.function.name", "is required", "missing_parameter")
    if name not in names:
        raise _bad("tool_choice.function.name", f"names {name!r}, which is not one of the "
                   "request's tools")
    return "function", name


def parse_tools(body: dict[str, Any]) -> ToolRequest | None:
    """The request's tools, or None when it offers none or asks for none (`tool_choice`
    "none": the tools are still checked, but neither rendered nor parsed)."""
    raw = body.get("tools")
    if raw is not None and not isinstance(raw, list):
        raise _bad("tools", "must be a list of function tools")
    if len(raw or ()) > MAX_TOOLS:
        raise _bad("tools", f"holds {len(raw or ())} tools; at most {MAX_TOOLS} are allowed")
    tools: list[Tool] = []
    for i, v in enumerate(raw or ()):
        tool = _tool(v, f"tools[{i}]")
        if any(t.name == tool.name for t in tools):
            raise _bad(f"tools[{i}].function.name", f"repeats the name {tool.name!r}")
        tools.append(tool)
    choice = body.get("tool_choice")
    if not tools:
        if choice is not None and choice != "none":
            # vLLM's rule: a tool choice other than "none" names tools the request must carry
            raise _bad("tool_choice", "needs 'tools': when using tool_choice, tools must be set")
        return None
    kind, named = _choice(choice, {t.name for t in tools})
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _bad("parallel_tool_calls", "must be a boolean")
    if kind == "none":
        return None
    return ToolRequest(tuple(tools), kind, named, parallel is not False)


def read_tool_calls(v: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls` as [{"id", "type", "function": {"name", "arguments"
    (an object, as chat templates read it)}}]."""
    if not isinstance(v, list):
        raise _bad(where, "must be a list of tool calls")
    out = []
    for j, call in enumerate(v):
        at = f"{where}[{j}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise _bad(at, "must be an object {\"id\", \"type\": \"function\", \"function\"}")
        fn = call["function"]
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(f"{at}.function.name", "must be a non-empty string",
                       "missing_parameter" if fn.get("name") is None else "invalid_parameter")
        args = fn.get("arguments", "{}")
        try:
            parsed = json.loads(args) if isinstance(args, str) else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise _bad(f"{at}.function.arguments", "must be a string holding a JSON object")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise _bad(f"{at}.id", "must be a string")
        out.append({"id": call_id or call_id_new(), "type": "function",
                    "function": {"name": fn["name"], "arguments": parsed}})
    return out


# -- formats and rendering ---------------------------------------------------------------------

def pick_format(source: str, reads_tools: bool) -> ToolFormat:
    """The call format of a chat template: Llama 3's JSON for templates that render tools and
    speak `ipython`, Hermes otherwise (and always for templates that ignore tools)."""
    if reads_tools and "<tool_call>" not in source and \
            ("ipython" in source or "<|python_tag|>" in source):
        return LLAMA3
    return HERMES


_SYSTEM = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def _as_text(messages: list[dict[str, Any]], tools: ToolRequest | None) -> list[dict[str, Any]]:
    """The conversation for a template that knows no tools: plain {role, content} turns."""
    out: list[dict[str, Any]] = []
    if tools is not None:
        listing = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in tools.offered)
        prompt = _SYSTEM.format(tools=listing)
        if messages and messages[0]["role"] == "system":
            prompt = messages[0]["content"] + "\n\n" + prompt
            messages = messages[1:]
        out.append({"role": "system", "content": prompt})
    for m in messages:
        if m["role"] == "tool":
            text = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):       # consecutive results: one turn
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "tool_results": True})
            continue
        content = m["content"]
        calls = [HERMES.write(c["function"]["name"], c["function"]["arguments"])
                 for c in m.get("tool_calls", ())]
        if calls:
            content = "\n".join(([content] if content else []) + calls)
        out.append({"role": m["role"], "content": content})
    for m in out:
        m.pop("tool_results", None)
    return out


def render_messages(source: str, reads_tools: bool, messages: list[dict[str, Any]],
                    tools: ToolRequest | None, render: Callable[..., str]) -> str:
    """The prompt: `render(messages, **variables)` runs the chat template `source`, which
    `reads_tools` or not (engines/llm/chat.template_variables)."""
    if reads_tools:
        return render(messages, **({"tools": [t.openai() for t in tools.offered]}
                                   if tools is not None else {}))
    return render(_as_text(messages, tools))


# -- the constraint ----------------------------------------------------------------------------

def constraint(tools: ToolRequest, fmt: ToolFormat) -> dict[str, Any] | None:
    """The engine's `structured` spec that makes the output a call (or, where the request and
    the format allow, several), or None for "auto"."""
    if tools.choice == "auto":
        return None
    alts = [{"type": "object", "additionalProperties": False,
             "required": ["name", fmt.args_key],
             "properties": {"name": {"const": t.name}, fmt.args_key: t.parameters}}
            for t in tools.offered]
    schema = {"anyOf": alts, "x-guidance": {"whitespace_flexible": False}}
    body = "body: %json " + json.dumps(schema, ensure_ascii=False)
    if not fmt.open:
        return {"type": "grammar", "grammar": "start: body\n" + body}
    several = tools.choice == "required" and tools.parallel and fmt.parallel
    start = 'start: call ("\\n" call)*' if several else "start: call"
    call = f'call: {json.dumps(fmt.open + chr(10))} body {json.dumps(chr(10) + fmt.close)}'
    return {"type": "grammar", "grammar": "\n".join((start, call, body))}
