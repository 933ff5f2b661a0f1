"""Client JSON, decoded one way for every HTTP route and WebSocket message.

`json.loads` alone lets three kinds of client input through as server errors: bytes nested deeper
than the interpreter's stack (`[` * 100000 raises RecursionError), bodies that are not UTF-8, and
`\\ud800`-style escapes, which decode to lone surrogates that no tokenizer, database or UTF-8
encoder accepts. All three are the client's mistake, so each becomes an `InvalidInput` with a
stable code: `invalid_json` (not JSON, or nested deeper than MAX_DEPTH) or `invalid_text` (a
string holding a lone surrogate).
"""
from __future__ import annotations

import json
import re
from typing import Any

from daemon.errors import InvalidInput

__all__ = ["MAX_DEPTH", "decode_json"]

MAX_DEPTH = 128        # arrays/objects inside one another; OpenAI bodies need a handful
# A surrogate, raw or as a high (D800-DBFF) or low (DC00-DFFF) escape: only then can a decoded
# string hold one alone. (Raw surrogate bytes fail the strict decode below; json.loads on bytes
# would let them through, as it decodes with "surrogatepass".)
_SURROGATE = re.compile("\\\\u[dD][89a-fA-F]|[\ud800-\udfff]")


def decode_json(raw: bytes | str) -> Any:
    """The JSON value of `raw`, or InvalidInput; strings in it are valid Unicode text."""
    try:
        text = raw.decode(json.detect_encoding(raw)) if isinstance(raw, bytes) else raw
        value = json.loads(text)
    except RecursionError:
        raise InvalidInput(f"the JSON is nested deeper than {MAX_DEPTH} levels",
                           code="invalid_json") from None
    except ValueError as exc:        # UnicodeDecodeError included
        raise InvalidInput(f"the request body is not valid JSON: {exc}",
                           code="invalid_json") from None
    # Cheap scans first: a value with fewer brackets than MAX_DEPTH cannot nest deeper.
    if text.count("[") + text.count("{") > MAX_DEPTH or _SURROGATE.search(text):
        _check(value)
    return value


def _check(value: Any) -> None:
    """Walk `value` without recursion: bounded depth, no lone surrogates in keys or strings."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _text(item)
        elif isinstance(item, (list, dict)):
            if depth >= MAX_DEPTH:
                raise InvalidInput(f"the JSON is nested deeper than {MAX_DEPTH} levels",
                                   code="invalid_json")
            if isinstance(item, dict):
                for key in item:
                    _text(key)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)


def _text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput("a string holds a lone UTF-16 surrogate (such as \\ud800), which is "
                           "not text", code="invalid_text") from None
