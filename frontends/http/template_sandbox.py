"""The sandbox prompt templates render in: Jinja's ImmutableSandboxedEnvironment, bounded.

Templates are written by admins; their variables come from any caller of a text route. So the
sandbox must hold against both a careless template and hostile variables:

- No Python internals: attributes and items whose name starts with `_` are refused when the
  template is stored (and by Jinja's sandbox at render time, e.g. through `|attr`); `extends`,
  `include` and `import` are refused (there is no loader). The only global is `range` (the
  sandbox caps it at 100,000 items): no `cycler`, `joiner`, `namespace`, `lipsum`, `dict`.
  Objects are immutable (no `.append`, no `.update`), `str.format` / `format_map` and the
  `format` filter are refused (a format width would allocate before any check could run).
- Bounded size: the source (`max_source_chars`), the variables as JSON, every intermediate
  string or list that `*`, `+`, `~`, `%`, `join`, `replace`, `indent` could make, numeric
  arguments of calls and filters (`center(10**9)`), and the output, counted as it streams.
  A list, tuple or dict is printed (`{{ }}`, `~`, `%`, a text filter) only when a walk that
  stops at the limit finds its text fits (60,000 references to one 60,000-character string
  cost nothing until str() makes 3.6 GB of them in C); all `{{ }}` output of a render, macro
  and set bodies included, and every block's join stay within 16 x max_output_chars.
- Bounded work: every Python line the render executes counts against `max_steps`, and the
  render stops at `render_timeout_s` (checked from a per-thread trace function), so a nested
  loop that prints nothing still ends.

Every refusal is `TemplateFailure(code, message)`; frontends/http/prompt_templates.py maps it.
"""
from __future__ import annotations

import functools
import re
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable

from jinja2 import Environment, StrictUndefined, TemplateError, TemplateSyntaxError, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError, safe_range

__all__ = ["Limits", "TemplateFailure", "Sandbox"]


@dataclass(slots=True, frozen=True)
class Limits:
    max_source_chars: int = 32768
    max_output_chars: int = 65536
    max_variables_chars: int = 262144
    max_steps: int = 1_000_000
    render_timeout_s: float = 1.0


class TemplateFailure(Exception):
    """A template that cannot be stored or rendered: a stable code and a message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Exhausted(BaseException):
    """Raised from the trace function; a BaseException so no `except Exception` inside Jinja
    or a filter swallows it."""


_REFUSED_ATTRS = frozenset({"format", "format_map", "mro"})
_REFUSED_NODES = (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)
_FORMAT_SPEC = re.compile(r"%[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_INT_BITS = 8192      # integers from * and ** stay below 2**8192
_EMITTED_FACTOR = 16  # all `{{ }}` output of a render, macro and set bodies too: 16x the output
# Filters that do not turn their value into text (a list that is too long to print may still be
# counted, sorted or sliced); every other filter's arguments must be printable within the limit.
_STRUCTURAL_FILTERS = frozenset({
    "abs", "attr", "batch", "count", "d", "default", "dictsort", "first", "float", "groupby",
    "int", "items", "last", "length", "list", "map", "max", "min", "random", "reject",
    "rejectattr", "reverse", "round", "select", "selectattr", "slice", "sort", "sum", "unique",
    "bool"})
_local = threading.local()    # the render running on this thread (its _Budget)


def _printed_size(value: Any, limit: int) -> int:
    """A lower bound on len(str(value)), walked only until it passes `limit` (so a list of a
    long string repeated, or a nested list doubled in a loop, is refused before str() makes
    gigabytes of it in C, where no step count or clock can stop it)."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            total += 2 + 2 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + len(v)
            stack.extend(v)
        else:
            total += 1
        if total > limit:
            return total
    return total


class _CheckedConcat(CodeGenerator):
    """`a ~ b` through the environment's size check instead of Jinja's plain str_join."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Env(ImmutableSandboxedEnvironment):
    code_generator_class = _CheckedConcat
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, limits: Limits) -> None:
        super().__init__(autoescape=False, keep_trailing_newline=True, undefined=StrictUndefined,
                         finalize=self._finalize)
        self.limits = limits
        self.globals.clear()
        self.globals["range"] = safe_range
        self.filters.pop("format", None)
        self.filters = {name: self._bounded(name, f) for name, f in self.filters.items()}

    # -- size checks -------------------------------------------------------------------------
    def _size(self, n: int, what: str) -> None:
        if n > self.limits.max_output_chars:
            raise TemplateFailure("template_output_too_large",
                                  f"{what} would make {n} characters or items, more than "
                                  f"max_output_chars ({self.limits.max_output_chars})")

    def _numbers(self, args: tuple[Any, ...], kwargs: dict[str, Any], what: str) -> None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) \
                    and abs(value) > self.limits.max_output_chars:
                raise TemplateFailure("template_render_error",
                                      f"{what}: numeric argument {value} is above the limit "
                                      f"({self.limits.max_output_chars})")

    def _printable(self, values: Any, what: str) -> None:
        limit = self.limits.max_output_chars
        for value in values:    # a string is made already: its growth is checked elsewhere
            if not isinstance(value, (str, int, float)) and value is not None:
                self._size(_printed_size(value, limit), what)

    def _finalize(self, value: Any) -> Any:
        """Every `{{ }}` value, in the template and in macro and set bodies: printable within
        the output limit, and all of them together within _EMITTED_FACTOR times it."""
        limit = self.limits.max_output_chars
        n = _printed_size(value, limit)
        if not isinstance(value, str):
            self._size(n, "'{{ }}'")
        budget = getattr(_local, "budget", None)
        if budget is not None:
            budget.emitted += n
            if budget.emitted > _EMITTED_FACTOR * limit:
                raise TemplateFailure("template_output_too_large",
                                      f"the template prints more than {_EMITTED_FACTOR} x "
                                      f"max_output_chars ({limit}) in all, macros included")
        return value

    def concat(self, parts: Any) -> str:
        """The body of a macro, call or set block: its size checked before the join."""
        parts = parts if isinstance(parts, list) else list(parts)
        n, limit = sum(len(p) for p in parts), _EMITTED_FACTOR * self.limits.max_output_chars
        if n > limit:
            raise TemplateFailure("template_output_too_large",
                                  f"a macro, call or set block would make {n} characters, "
                                  f"more than {_EMITTED_FACTOR} x max_output_chars")
        return "".join(parts)

    def checked_concat(self, parts: tuple[Any, ...]) -> str:
        self._printable(parts, "'~'")
        texts = [str(p) for p in parts]
        self._size(sum(map(len, texts)), "'~'")
        return "".join(texts)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        seqs = (str, list, tuple)
        if operator == "*":
            if isinstance(left, seqs) and isinstance(right, int):
                self._size(len(left) * max(right, 0), "'*'")
            elif isinstance(right, seqs) and isinstance(left, int):
                self._size(len(right) * max(left, 0), "'*'")
            elif isinstance(left, int) and isinstance(right, int) \
                    and left.bit_length() + right.bit_length() > _INT_BITS:
                raise TemplateFailure("template_render_error", "'*': the product is too large")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 \
                    and max(left.bit_length(), 1) * right > _INT_BITS:
                raise TemplateFailure("template_render_error", "'**': the power is too large")
        elif operator == "+":
            if isinstance(left, seqs) and isinstance(right, seqs):
                self._size(len(left) + len(right), "'+'")
        elif operator == "%" and isinstance(left, str):
            self._printable(right if isinstance(right, tuple) else (right,), "'%'")
            for width, precision in _FORMAT_SPEC.findall(left):
                for n in (width, precision):
                    if n == "*" or (n and int(n) > self.limits.max_output_chars):
                        raise TemplateFailure("template_render_error",
                                              "'%': the format width is too large")
        return super().call_binop(context, operator, left, right)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if attr in _REFUSED_ATTRS:
            return False
        return super().is_safe_attribute(obj, attr, value)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        if __obj is not safe_range:
            __self._numbers(args, kwargs, "call")
            owner = getattr(__obj, "__self__", None)
            name = getattr(__obj, "__name__", "")
            if isinstance(owner, str) and name in ("join", "replace") and args:
                if name == "join":      # an iterator is read once: check and pass the list
                    args = (list(args[0]), *args[1:])
                __self._string_op(owner, name, args)
        return super().call(__context, __obj, *args, **kwargs)

    def _string_op(self, s: str, name: str, args: tuple[Any, ...]) -> None:
        if name == "join":
            items = list(args[0])
            self._size(len(s) * max(len(items) - 1, 0)
                       + sum(len(x) if isinstance(x, str) else 0 for x in items), "join")
        elif len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            count = s.count(args[0])
            self._size(len(s) + count * (len(args[1]) - len(args[0])), "replace")

    def _bounded(self, name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        """A filter whose numeric arguments and obvious growth (join, replace, indent) are
        checked before it runs."""
        @functools.wraps(f)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            self._numbers(args, kwargs, f"filter {name!r}")
            # the value follows any context, eval context or environment argument
            at = next((i for i, a in enumerate(args) if not hasattr(a, "environment")
                       and not isinstance(a, Environment)), None)
            if name not in _STRUCTURAL_FILTERS and name != "join" and at is not None:
                self._printable((*args[at:], *kwargs.values()), f"filter {name!r}")
            if name in ("join", "replace", "indent") and at is not None:
                if name == "join" and not isinstance(args[at], (str, list, tuple)):
                    args = (*args[:at], list(args[at]), *args[at + 1:])  # read an iterator once
                self._filter_growth(name, list(args[at:]), kwargs)
            return f(*args, **kwargs)
        return bounded

    def _filter_growth(self, name: str, values: list[Any], kwargs: dict[str, Any]) -> None:
        value, rest = values[0], values[1:]
        if name == "join":
            limit = self.limits.max_output_chars
            items = list(value)
            sep = rest[0] if rest else kwargs.get("d", "")
            self._printable((sep,), "join")
            total = len(str(sep)) * max(len(items) - 1, 0)
            for x in items:       # stops at the limit: no item walked past it
                total += len(x) if isinstance(x, str) else _printed_size(x, limit - total)
                if total > limit:
                    break
            self._size(total, "join")
        elif name == "replace" and isinstance(value, str) and len(rest) >= 2:
            old, new = str(rest[0]), str(rest[1])
            self._size(len(value) + value.count(old) * (len(new) - len(old)), "replace")
        elif name == "indent" and isinstance(value, str):
            width = rest[0] if rest else kwargs.get("width", 4)
            pad = len(width) if isinstance(width, str) else int(width)
            self._size(len(value) + (value.count("\n") + 1) * pad, "indent")


class _Budget:
    """A trace function counting executed lines and watching the clock."""

    def __init__(self, limits: Limits) -> None:
        self.steps = limits.max_steps
        self.emitted = 0          # characters printed by `{{ }}` so far (_Env._finalize)
        self.deadline = time.monotonic() + limits.render_timeout_s
        self.why = ""

    def trace(self, frame: FrameType, event: str, arg: Any) -> Callable[..., Any]:
        self.steps -= 1
        if self.steps <= 0:
            self.why = "the template needs more than max_steps steps"
            raise _Exhausted
        if self.steps & 1023 == 0 and time.monotonic() > self.deadline:
            self.why = "the template ran past render_timeout_s"
            raise _Exhausted
        return self.trace


def _unsafe(tree: nodes.Template) -> str | None:
    for stmt in tree.find_all(_REFUSED_NODES):
        return f"line {stmt.lineno}: '{type(stmt).__name__.lower()}' is not allowed"
    for expr in tree.find_all((nodes.Getattr, nodes.Getitem)):
        key: object = None
        if isinstance(expr, nodes.Getattr):
            key = expr.attr
        elif isinstance(expr, nodes.Getitem) and isinstance(expr.arg, nodes.Const):
            key = expr.arg.value
        if isinstance(key, str) and (key.startswith("_") or key in _REFUSED_ATTRS):
            return f"line {expr.lineno}: access to {key!r} is not allowed"
    return None


class Sandbox:
    """Compiles and renders prompt templates under `limits`; compiled templates are cached by
    their source text (so a cache entry is never stale)."""

    _CACHE = 256

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.env = _Env(self.limits)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def reconfigure(self, limits: Limits) -> None:
        """New limits from now on (renders already running keep theirs)."""
        if limits != self.limits:
            with self._lock:
                self.limits, self.env = limits, _Env(limits)
                self._cache.clear()

    def check(self, source: object) -> str:
        """The source if it may be stored, else TemplateFailure (template_too_large,
        invalid_template)."""
        if not isinstance(source, str) or not source:
            raise TemplateFailure("invalid_template", "'template' must be a non-empty string")
        if len(source) > self.limits.max_source_chars:
            raise TemplateFailure("template_too_large",
                                  f"the template is {len(source)} characters; at most "
                                  f"{self.limits.max_source_chars} (max_source_chars)")
        self.compile(source)
        return source

    def compile(self, source: str) -> Any:
        with self._lock:
            cached = self._cache.get(source)
            if cached is not None:
                self._cache.move_to_end(source)
                return cached
        try:
            tree = self.env.parse(source)
        except TemplateSyntaxError as exc:
            raise TemplateFailure("invalid_template",
                                  f"line {exc.lineno}: {exc.message}") from None
        except RecursionError:
            raise TemplateFailure("invalid_template", "the template nests too deeply") from None
        why = _unsafe(tree)
        if why is not None:
            raise TemplateFailure("invalid_template", why)
        try:
            template = self.env.from_string(tree)
        except (TemplateError, RecursionError, SyntaxError) as exc:
            raise TemplateFailure("invalid_template", str(exc)) from None
        with self._lock:
            self._cache[source] = template
            while len(self._cache) > self._CACHE:
                self._cache.popitem(last=False)
        return template

    def render(self, source: str, variables: dict[str, Any]) -> str:
        """Render on the calling thread (run it on a worker thread: it may take up to
        render_timeout_s). TemplateFailure on any error."""
        template = self.compile(source)
        budget = _Budget(self.limits)
        out: list[str] = []
        size = 0
        previous = sys.gettrace()
        _local.budget = budget
        sys.settrace(budget.trace)
        try:
            for chunk in template.generate(**variables):
                size += len(chunk)
                if size > self.limits.max_output_chars:
                    raise TemplateFailure("template_output_too_large",
                                          "the rendered prompt is longer than max_output_chars "
                                          f"({self.limits.max_output_chars})")
                out.append(chunk)
        except _Exhausted:
            raise TemplateFailure("template_render_error", budget.why) from None
        except TemplateFailure:
            raise
        except SecurityError as exc:
            raise TemplateFailure("template_render_error", f"refused: {exc}") from None
        except TemplateError as exc:        # undefined variables, filters misused, …
            raise TemplateFailure("template_render_error", str(exc)) from None
        except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError,
                MemoryError) as exc:        # what the template's own expressions raise
            raise TemplateFailure("template_render_error",
                                  f"{type(exc).__name__}: {exc}") from None
        finally:
            sys.settrace(previous)
            _local.budget = None
        return "".join(out)
