"""The request fields that constrain a generation's output, read into the engine's
`structured` parameter (engines/llm/grammar.py compiles it; a constraint that does not compile
is a 400 `invalid_grammar` from the engine). Chat and completions accept, as OpenAI and vLLM do:

- `response_format`: `{"type": "text"}` (no constraint), `{"type": "json_object"}`, or
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` (what
  `client.beta.chat.completions.parse(response_format=PydanticModel)` sends);
- vLLM's `structured_outputs`: `{"json": schema | str}`, `{"regex": str}`, `{"choice": [...]}`,
  `{"grammar": str}` (EBNF or Lark), `{"json_object": true}`;
- vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.

At most one constraint per request: two are a 400 `invalid_parameter` naming the second. The
constraint is compiled here (without the vocabulary, a few ms), so one that cannot compile is a
400 `invalid_grammar` naming its field before anything reaches an engine, streamed or not.
"""
from __future__ import annotations

import json
from typing import Any

from daemon.errors import InvalidInput
from engines.llm.grammar import validate_structured

__all__ = ["parse_structured"]

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
# structured_outputs keys that only tune how a constraint is applied: accepted, not needed.
_TUNING = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties",
           "whitespace_pattern")


def _bad(param: str, why: str, code: str = "invalid_parameter") -> InvalidInput:
    return InvalidInput(f"'{param}' {why}", code=code, param=param)


def _schema(value: Any, param: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise _bad(param, "must be a JSON schema (an object, or a string holding one)")
    if not isinstance(value, dict):
        raise _bad(param, "must be a JSON schema object")
    return value


def _spec(kind: str, value: Any, param: str) -> dict[str, Any]:
    """One vLLM-style constraint ("json", "regex", "choice", "grammar") as the engine's spec."""
    if kind == "json":
        return {"type": "json_schema", "schema": _schema(value, param)}
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise _bad(param, "must be a non-empty regular expression string")
        return {"type": "regex", "pattern": value}
    if kind == "choice":
        if not isinstance(value, list) or not value or \
                not all(isinstance(c, str) and c for c in value):
            raise _bad(param, "must be a non-empty list of non-empty strings")
        return {"type": "choice", "choices": value}
    if not isinstance(value, str) or not value.strip():
        raise _bad(param, "must be a non-empty grammar string (EBNF or Lark)")
    return {"type": "grammar", "grammar": value}


def _response_format(fmt: Any) -> dict[str, Any] | None:
    if not isinstance(fmt, dict):
        raise _bad("response_format", "must be an object with a 'type'")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict):
            raise _bad("response_format.json_schema", "must be an object with a 'schema'",
                       "missing_parameter" if js is None else "invalid_parameter")
        schema = js.get("schema", {"type": "object"})   # OpenAI: the schema is optional
        return {"type": "json_schema",
                "schema": _schema(schema, "response_format.json_schema.schema")}
    raise _bad("response_format.type", "must be 'text', 'json_object' or 'json_schema', got "
               f"{kind!r}")


def _structured_outputs(so: Any) -> dict[str, Any] | None:
    if not isinstance(so, dict):
        raise _bad("structured_outputs", "must be an object")
    found: list[dict[str, Any]] = []
    for key, value in so.items():
        if value is None or key in _TUNING:
            continue
        param = f"structured_outputs.{key}"
        if key == "json_object":
            if value is not True and value is not False:
                raise _bad(param, "must be a boolean")
            if value:
                found.append({"type": "json_object"})
        elif key in ("json", "regex", "choice", "grammar"):
            found.append(_spec(key, value, param))
        else:
            raise _bad(param, "is not supported (json, regex, choice, grammar, json_object)",
                       "unsupported_parameter")
        if len(found) > 1:
            raise _bad(param, "is a second constraint; give exactly one")
    return found[0] if found else None


def parse_structured(body: dict[str, Any]) -> dict[str, Any] | None:
    """The engine's `structured` spec of a chat or completion body, or None."""
    found: list[tuple[str, dict[str, Any]]] = []
    fmt = body.get("response_format")
    if fmt is not None:
        spec = _response_format(fmt)
        if spec is not None:
            found.append(("response_format", spec))
    so = body.get("structured_outputs")
    if so is not None:
        spec = _structured_outputs(so)
        if spec is not None:
            found.append(("structured_outputs", spec))
    for key, kind in _GUIDED.items():
        if body.get(key) is not None:
            found.append((key, _spec(kind, body[key], key)))
    if len(found) > 1:
        raise _bad(found[1][0], f"constrains the output a second time (after "
                   f"'{found[0][0]}'); give exactly one constraint")
    if not found:
        return None
    param, spec = found[0]
    try:                                  # compiles it: a bad one is a 400 before any stream
        return validate_structured(spec)
    except InvalidInput as exc:
        exc.param = param
        raise
