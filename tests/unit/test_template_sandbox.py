"""The prompt-template sandbox (frontends/http/template_sandbox.py): what renders, and every
escape or blow-up refused with its stable code, quickly and without allocating the blow-up."""
from __future__ import annotations

import time

import pytest

from frontends.http.template_sandbox import Limits, Sandbox, TemplateFailure

pytestmark = pytest.mark.timeout(60)


def _render(source: str, limits: Limits | None = None, **variables) -> str:
    box = Sandbox(limits)
    return box.render(box.check(source), variables)


def _refused(source: str, limits: Limits | None = None, **variables) -> TemplateFailure:
    with pytest.raises(TemplateFailure) as info:
        _render(source, limits, **variables)
    return info.value


def test_templates_render_with_variables_loops_and_filters():
    src = ("You help with {{ product|upper }}.\n{% for q in questions %}"
           "{{ loop.index }}. {{ q|trim }}\n{% endfor %}{{ '%3d' % n }}|{{ 'ab' ~ n }}")
    out = _render(src, product="ferry", questions=[" a ", "b"], n=7)
    assert out == "You help with FERRY.\n1. a\n2. b\n  7|ab7"


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ x['__class__'] }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ '{:>99999999}'.format(1) }}",
    "{{ 'x'.format_map({}) }}",
    "{% extends 'base' %}",
    "{% include 'other' %}",
    "{% import 'macros' as m %}",
    "{% from 'm' import f %}",
    "{{ unclosed ",
    "{% for x in y %}",
    "",
])
def test_unsafe_or_malformed_sources_are_refused_when_stored(source):
    with pytest.raises(TemplateFailure) as info:
        Sandbox().check(source)
    assert info.value.code == "invalid_template"


@pytest.mark.parametrize("source,variables", [
    ("{{ ''|attr('__class__') }}", {}),
    ("{% set k = '__cla' ~ 'ss__' %}{{ x[k] }}", {"x": 1}),
    ("{{ x|attr('__globals__') }}", {"x": "s"}),
    ("{{ cycler }}", {}),
    ("{{ joiner() }}", {}),
    ("{{ namespace(a=1) }}", {}),
    ("{{ lipsum(5) }}", {}),
    ("{{ dict(a=1) }}", {}),
    ("{{ [1].append(2) }}", {}),
    ("{{ {}.update({'a': 1}) }}", {}),
    ("{{ missing }}", {}),
    ("{{ 1 / 0 }}", {}),
    ("{{ 9 ** 99999999 }}", {}),
    ("{{ '%999999999d' % 1 }}", {}),
    ("{{ 'x'|center(999999999) }}", {}),
    ("{{ 'x'.ljust(999999999) }}", {}),
    ("{{ range(1000000)|list }}", {}),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", {}),
])
def test_escapes_and_runtime_errors_are_render_errors(source, variables):
    assert _refused(source, **variables).code == "template_render_error"


@pytest.mark.parametrize("source,variables", [
    ("{{ 'a' * 1000000000 }}", {}),
    ("{{ big|replace('', big) }}", {"big": "x" * 60000}),
    ("{{ big.replace('', big) }}", {"big": "x" * 60000}),
    ("{{ big|join(big) }}", {"big": "x" * 60000}),
    ("{{ big.join(big) }}", {"big": "x" * 60000}),
    ("{{ big|indent(big) }}", {"big": "\n" * 60000}),
    ("{{ big ~ big }}", {"big": "x" * 40000}),
    ("{{ big + big }}", {"big": "x" * 40000}),
    ("{% for i in range(100000) %}{% for j in range(100000) %}a{% endfor %}{% endfor %}", {}),
])
def test_growth_past_the_output_bound_is_refused_before_it_is_built(source, variables):
    started = time.monotonic()
    assert _refused(source, **variables).code == "template_output_too_large"
    assert time.monotonic() - started < 5


def test_a_loop_that_prints_nothing_stops_at_the_step_budget():
    src = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    started = time.monotonic()
    err = _refused(src, Limits(max_steps=50_000))
    assert err.code == "template_render_error" and "max_steps" in err.message
    assert time.monotonic() - started < 5


def test_a_slow_render_stops_at_the_timeout():
    src = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    started = time.monotonic()
    err = _refused(src, Limits(max_steps=10**9, render_timeout_s=0.3))
    assert err.code == "template_render_error" and "render_timeout_s" in err.message
    assert time.monotonic() - started < 5


def test_join_reads_an_iterator_once():
    assert _render("{{ range(4)|map('string')|join(',') }}") == "0,1,2,3"
    assert _render("{{ ','.join(range(3)|map('string')) }}") == "0,1,2"
    assert _render("{{ xs|select('odd')|join('-') }}", xs=[1, 2, 3]) == "1-3"


def test_source_size_is_bounded():
    box = Sandbox(Limits(max_source_chars=100))
    assert box.check("x" * 100) == "x" * 100
    with pytest.raises(TemplateFailure) as info:
        box.check("x" * 101)
    assert info.value.code == "template_too_large"


def test_output_bound_counts_the_streamed_output():
    limits = Limits(max_output_chars=1000)
    assert len(_render("{{ x }}" * 10, limits, x="y" * 100)) == 1000
    assert _refused("{{ x }}" * 11, limits, x="y" * 100).code == "template_output_too_large"


def test_reconfigure_applies_new_limits_and_drops_compiled_templates():
    box = Sandbox(Limits(max_output_chars=10))
    with pytest.raises(TemplateFailure):
        box.render(box.check("{{ 'a' * 20 }}"), {})
    box.reconfigure(Limits(max_output_chars=100))
    assert box.render("{{ 'a' * 20 }}", {}) == "a" * 20


def test_tracing_is_restored_after_a_render():
    import sys
    before = sys.gettrace()
    _render("{{ 1 }}")
    _refused("{{ missing }}")
    assert sys.gettrace() is before


_BIG_LIST = "{% set s = 'x' * 60000 %}{% set l = [s] * 60000 %}"


@pytest.mark.parametrize("use", [
    "{{ l }}", "{{ l|center(5) }}", "{{ l|string|length }}", "{{ l|tojson|length }}",
    "{{ (l ~ '')|length }}", "{{ ('%s' % (l,))|length }}", "{{ ('%s' % l)|length }}",
    "{% set m = [l] * 60000 %}{{ m|join(',')|length }}",
    "{% set m = [l] * 60000 %}{{ m|pprint|length }}",
])
def test_a_container_too_large_to_print_is_refused_before_str_builds_it(use):
    # 60,000 references to one 60,000-character string are cheap; their text is 3.6 GB, made
    # by str() in C where neither the step budget nor the clock can stop it
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    assert _refused(_BIG_LIST + use).code == "template_output_too_large"
    assert time.monotonic() - started < 5.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000   # KiB


def test_a_large_container_may_still_be_counted_and_sliced():
    assert _render(_BIG_LIST + "{{ l|length }} {{ l|first|length }} {{ l[:2]|length }}") \
        == "60000 60000 2"
    assert _render("{{ (('x' * 40000)|list|join)|length }}") == "40000"


@pytest.mark.parametrize("source", [
    # each piece is a new 60,000-character string: 6 GB kept in the macro's buffer
    "{% set s = 'x' * 60000 %}{% macro f() %}{% for i in range(100000) %}{{ s ~ '' }}"
    "{% endfor %}{% endmacro %}{{ f()|length }}",
    # one constant repeated: references only, but the block's join would make 3 GB
    "{% macro f() %}{% for i in range(100000) %}" + "y" * 30000 + "{% endfor %}{% endmacro %}"
    "{{ f()|length }}",
    "{% set t %}{% for i in range(100000) %}" + "y" * 30000 + "{% endfor %}{% endset %}"
    "{{ t|length }}",
])
def test_macro_and_set_blocks_are_bounded_too(source):
    started = time.monotonic()
    assert _refused(source).code == "template_output_too_large"
    assert time.monotonic() - started < 5.0


def test_a_long_variable_may_be_shortened_in_a_block():
    text = "word " * 40000                 # 200,000 characters, within max_variables_chars
    out = _render("{% set t %}{{ text }}{% endset %}{{ t|truncate(20) }}|"
                  "{{ text|truncate(10) }}", text=text)
    assert out == "word word word...|word...", out
