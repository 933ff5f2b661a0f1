"""Tool calls in generated text: the formats models write them in, and a parser that splits an
output, fed piece by piece as it streams, into content and calls.

- Hermes (Qwen, Hermes, and Ferry's fallback for templates that know no tools):
  `<tool_call>` newline `{"name": ..., "arguments": {...}}` newline `</tool_call>`, several for
  parallel calls;
- Llama 3 JSON (templates that speak `ipython`): the output is `{"name": ..., "parameters":
  {...}}`.

A call is announced (id, name) as soon as its name is complete and its arguments stream after
it, as OpenAI's `delta.tool_calls` do; text that turns out to be no call of the request's tools
(another name, broken JSON) is content after all. Whitespace before a call is dropped.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ToolFormat", "HERMES", "LLAMA3", "ToolCall", "ToolDelta", "ToolCallParser",
           "parse_calls", "call_id_new"]


def call_id_new() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """How a model writes a call: `open` {"name": ..., `args_key`: {...}} `close`."""

    name: str
    open: str                         # "": the call is the whole output, from its start
    close: str
    args_key: str
    parallel: bool                    # whether several calls may follow one another

    def write(self, name: str, arguments: Any) -> str:
        body = json.dumps({"name": name, self.args_key: arguments}, ensure_ascii=False)
        return f"{self.open}\n{body}\n{self.close}" if self.open else body


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>", "arguments", parallel=True)
LLAMA3 = ToolFormat("llama3_json", "", "", "parameters", parallel=False)


@dataclass(slots=True)
class ToolCall:
    index: int
    name: str
    arguments: str = ""               # JSON text, as the model wrote it
    id: str = field(default_factory=call_id_new)

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(slots=True)
class ToolDelta:
    """One step of parsed output: content text, a call's start (`call` set, arguments empty),
    or a piece of a call's arguments (`call` set)."""

    content: str = ""
    call: ToolCall | None = None
    arguments: str = ""
    start: bool = False

    def openai(self) -> dict[str, Any]:
        """The chat chunk's `delta`: content, or a `tool_calls` entry (index, id, type and name
        at a call's start; arguments pieces after), as the openai client assembles them."""
        if self.call is None:
            return {"content": self.content}
        if self.start:
            return {"tool_calls": [{"index": self.call.index, "id": self.call.id,
                                    "type": "function",
                                    "function": {"name": self.call.name, "arguments": ""}}]}
        return {"tool_calls": [{"index": self.call.index,
                                "function": {"arguments": self.arguments}}]}


def _value_end(text: str, start: int) -> int | None:
    """Index just past the JSON object or array opening at text[start]; None while it is open.
    (Only brackets outside strings are counted: the text is JSON or the grammar made it so.)"""
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


class ToolCallParser:
    """Splits generated text, fed in pieces, into content and tool calls of one format; a call
    is announced (id, name) as soon as its name is complete and its arguments stream after."""

    def __init__(self, fmt: ToolFormat, names: set[str]) -> None:
        self.fmt, self.names = fmt, names
        self.calls: list[ToolCall] = []
        self._text = ""               # undecided text (outside a call)
        self._call: str | None = None  # the text of the call being read, after `open`
        self._sent = 0                # how much of the current call's arguments went out
        self._args_at: int | None = None
        self._current: ToolCall | None = None
        self._spaces = ""             # whitespace held until text follows it
        self._at_start = True
        self._header = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*'
                                  + re.escape(json.dumps(fmt.args_key)) + r"\s*:\s*")

    def feed(self, text: str) -> list[ToolDelta]:
        out: list[ToolDelta] = []
        if self._call is None:
            self._text += text
        else:
            self._call += text
        while self._step(out):
            pass
        return out

    def finish(self) -> list[ToolDelta]:
        """What is left at the end of the output: an unfinished call keeps what it has."""
        out: list[ToolDelta] = []
        call = self._call
        if call is not None and self._current is None:          # a call, or never was one
            first = call.find("{")
            end = _value_end(call, first) if first >= 0 else None
            if end is None or not self._whole_call(call[first:end], out):
                self._content(self.fmt.open + call, out)
            else:
                self._content(call[end:], out)
        self._call = None
        self._content(self._text, out)
        if not self.calls and self._spaces:
            out.append(ToolDelta(content=self._spaces))
        self._text = self._spaces = ""
        return out

    def _content(self, text: str, out: list[ToolDelta]) -> None:
        body = text.rstrip()
        if body:            # trailing whitespace waits: before a call, it is dropped
            out.append(ToolDelta(content=self._spaces + body))
            self._spaces = text[len(body):]
            self._at_start = False
        else:
            self._spaces += text

    def _step(self, out: list[ToolDelta]) -> bool:
        """Advance once; True while there may be more to do."""
        if self._call is None:
            return self._scan_text(out)
        return self._scan_call(out)

    def _scan_text(self, out: list[ToolDelta]) -> bool:
        text, marker = self._text, self.fmt.open
        if not marker:
            stripped = text.lstrip()
            if self._at_start and not self.calls and stripped.startswith("{"):
                self._text, self._call = "", text
                return True
            if stripped or not self._at_start:
                self._text = ""
                self._content(text, out)
            return False
        at = text.find(marker)
        if at >= 0:
            self._content(text[:at], out)
            self._text, self._call = "", text[at + len(marker):]
            return True
        hold = next((k for k in range(min(len(text), len(marker) - 1), 0, -1)
                     if marker.startswith(text[-k:])), 0)
        self._content(text[:len(text) - hold], out)
        self._text = text[len(text) - hold:]
        return False

    def _scan_call(self, out: list[ToolDelta]) -> bool:
        call = self._call or ""
        if self._current is None:
            m = self._header.match(call)
            if m and json.loads(m.group(1)) in self.names and call[m.end():m.end() + 1] == "{":
                self._current = ToolCall(len(self.calls), json.loads(m.group(1)))
                self.calls.append(self._current)
                self._args_at = self._sent = m.end()
                out.append(ToolDelta(call=self._current, start=True))
        if self._current is not None and self._args_at is not None:
            end = _value_end(call, self._args_at)
            upto = len(call) if end is None else end
            if upto > self._sent:
                piece = call[self._sent:upto]
                self._current.arguments += piece
                out.append(ToolDelta(call=self._current, arguments=piece))
                self._sent = upto
        first = call.find("{")
        if first < 0:
            if call.strip():                                     # not a call after all
                self._end_call(self.fmt.open + call, "", out)
            return False
        end = _value_end(call, first)
        if end is None:
            return False
        rest = call[end:]
        if self.fmt.close:
            tail = rest.lstrip()
            if self.fmt.close.startswith(tail) and len(tail) < len(self.fmt.close):
                return False                                     # the close may follow
            if tail.startswith(self.fmt.close):
                rest = tail[len(self.fmt.close):]
        if self._current is None and not self._whole_call(call[first:end], out):
            self._end_call(self.fmt.open + call[:len(call) - len(rest)], rest, out)
            return True
        self._end_call("", rest, out)
        return True

    def _whole_call(self, text: str, out: list[ToolDelta]) -> bool:
        """A call the header did not catch (keys in another order): the whole object parsed.
        False when it is no call of these tools."""
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        args = obj.get(self.fmt.args_key) if isinstance(obj, dict) else None
        if not isinstance(args, dict) or obj.get("name") not in self.names:
            return False
        call = ToolCall(len(self.calls), obj["name"])
        self.calls.append(call)
        call.arguments = json.dumps(args, ensure_ascii=False)
        out += [ToolDelta(call=call, start=True), ToolDelta(call=call, arguments=call.arguments)]
        return True

    def _end_call(self, content: str, rest: str, out: list[ToolDelta]) -> None:
        self._content(content, out)
        self._call, self._current, self._args_at, self._sent = None, None, None, 0
        self._text = rest


def parse_calls(parser: ToolCallParser, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole output: content is None when the output is only calls."""
    deltas = parser.feed(text) + parser.finish()
    content = "".join(d.content for d in deltas)
    if parser.calls and not content.strip():
        return None, parser.calls
    return content, parser.calls
