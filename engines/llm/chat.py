"""Chat templates: Jinja2 programs that turn a message list into a prompt, rendered as HF does.

Templates come from model files (GGUF `tokenizer.chat_template`, `tokenizer_config.json`) or a
model.toml override, so they are untrusted code: they run in Jinja2's immutable sandbox. The
environment matches transformers' (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
`tojson` without ASCII escaping, `strftime_now`) so templates written for HF render identically.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

from daemon.errors import InvalidInput

__all__ = ["ChatTemplate", "render_chat", "template_variables"]


class TemplateRaised(InvalidInput):
    """A template rejected the conversation through `raise_exception` (e.g. roles out of order)."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(f"chat template rejected the messages: {message}", param="messages")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled template. Raises InvalidInput at construction when the source does not parse."""

    def __init__(self, source: str) -> None:
        import jinja2

        self.source = source
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as exc:
            raise InvalidInput(f"chat template does not compile: {exc}") from exc

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               **variables: Any) -> str:
        """The prompt text; `variables` such as bos_token, eos_token or tools reach the template."""
        import jinja2

        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InvalidInput("messages must be a list of objects", param="messages")
        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except InvalidInput:
            raise
        except jinja2.TemplateError as exc:  # sandbox violations included
            raise InvalidInput(f"chat template failed: {exc}", param="messages") from exc
        except (TypeError, KeyError, AttributeError, ValueError) as exc:
            # A message missing a field the template reads, or of the wrong type.
            raise InvalidInput(f"chat template failed on these messages: {exc!r}",
                               param="messages") from exc


@functools.lru_cache(maxsize=16)
def _compiled(source: str) -> ChatTemplate:
    return ChatTemplate(source)


def render_chat(source: str, messages: list[dict], add_generation_prompt: bool = True,
                **variables: Any) -> str:
    """Render with a template compiled once per distinct source."""
    return _compiled(source).render(messages, add_generation_prompt, **variables)


@functools.lru_cache(maxsize=16)
def template_variables(source: str) -> frozenset[str]:
    """The variables a template reads from its context (`messages`, `tools`, `bos_token`, ...):
    whether it renders tools itself is whether `tools` is among them."""
    import jinja2
    from jinja2 import meta

    try:
        return frozenset(meta.find_undeclared_variables(_environment().parse(source)))
    except jinja2.TemplateError as exc:
        raise InvalidInput(f"chat template does not compile: {exc}") from exc
