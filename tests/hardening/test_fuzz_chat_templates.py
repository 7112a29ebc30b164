"""Fuzzing chat templates (they come from model files): a template renders, or fails with a ChatTemplateError,
within its time limit and output size, and never reaches outside the sandbox."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fuzzing import SLOW_EXAMPLES
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaforge.chat import ChatTemplateError, render_jinja, template_limits

LIMIT_S = 0.3
MAX_CHARS = 100_000
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ✓ {{ 7*7 }}"}]
NUMBERS = [0, 1, 2, 10, 1000, 100_000, 10_000_000, 10**9, 10**18, -1]
ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ joiner.__init__.__globals__['os'].system('touch MARKER') }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ self.__init__.__globals__.__builtins__ }}",
    "{{ raise_exception.__globals__['__builtins__']['open']('MARKER', 'w') }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ dict.__call__.__globals__ }}",
    "{{ strftime_now.__globals__['datetime'] }}",
    "{{ (messages|first).items.__self__.__class__ }}",
    "{{ ''.format.__self__.__class__ }}",
    "{{ '{0.__class__}'.format(messages) }}",
]
FRAGMENTS = [
    "{{ messages[0]['content'] }}",
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
    "{{ 'ab' * N }}",
    "{{ messages * N }}",
    "{{ 'ab'|center(N) }}",
    "{{ 'a'|indent(N) }}",
    "{{ 'abc'|truncate(N) }}",
    "{{ 'x y'|wordwrap(N) }}",
    "{{ [1, 2]|batch(N)|list }}",
    "{{ 'abc'|replace('a', 'aaaaaaaaaa' * 1000) }}",
    "{{ '{:>N}'.format(1) }}",
    "{{ '%Ns'|format('x') }}",
    "{{ '%*s'|format(N, 'x') }}",
    "{{ 'x'.ljust(N) }}",
    "{{ 'x'.zfill(N) }}",
    "{{ N ** N }}",
    "{{ (N ** 64) ** 64 }}",
    "{{ range(N)|list|length }}",
    "{{ range(N)|join(',') }}",
    "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('ab') }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(N) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "{% for i in range(N) %}{% for j in range(N) %}{% endfor %}{% endfor %}",
    "{% for i in range(N) %}{% for j in range(N) %}{% for k in range(N) %}{% endfor %}{% endfor %}{% endfor %}",
    "{% for i in range(N) %}{% for j in range(N) %}x{% endfor %}{% endfor %}",
    "{{ raise_exception('no system messages') }}",
    "{{ messages|tojson }}",
    "{{ messages[N] }}",
    "{{ undefined_name.attr }}",
    "{{ 1 / 0 }}",
    "{% if %}",
    "{{ strftime_now('%Y-%m-%d') }}",
    "{{ dict(a=1)|tojson }}",
    "{{ lipsum(N) }}",
    "{% generation %}{{ messages[-1].content }}{% endgeneration %}",
    "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}",
    *ESCAPES,
]


@st.composite
def templates(draw: Any) -> str:
    parts = draw(st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=4))
    text = "".join(p.replace("N", str(draw(st.sampled_from(NUMBERS)))) for p in parts)
    if draw(st.integers(0, 4)) == 4:
        text += draw(st.text(alphabet="{}%#()[]|~.'\"*+-_ abcN0123456789", max_size=30))
    return text


def check_template(template: str, marker: Path) -> None:
    template = template.replace("MARKER", str(marker))
    start = time.monotonic()
    try:
        with template_limits(seconds=LIMIT_S, max_chars=MAX_CHARS):
            out = render_jinja(template, MESSAGES)
    except ChatTemplateError:
        pass
    else:
        assert isinstance(out, str) and len(out) <= MAX_CHARS
    elapsed = time.monotonic() - start
    assert elapsed < LIMIT_S + 2.0, f"rendering took {elapsed:.1f} s"
    assert not marker.exists(), "the template reached outside the sandbox"


@pytest.mark.parametrize("template", ESCAPES)
def test_sandbox_escapes_are_refused(template: str, tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError):
        render_jinja(template.replace("MARKER", str(tmp_path / "pwned")), MESSAGES)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('ab') }}",
    "{{ 'x'|center(10**12) }}",
    "{{ '{:>99999999999}'.format(1) }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
])  # fmt: skip
def test_runaway_templates_stop_within_the_limits(template: str) -> None:
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=r"limit|too large|recursion|not allowed"), template_limits(seconds=0.5):
        render_jinja(template, MESSAGES)
    assert time.monotonic() - start < 3


def test_limits_apply_inside_the_block_only() -> None:
    slow = "{% for i in range(20000) %}{% for j in range(10) %}{% endfor %}{% endfor %}done"
    with pytest.raises(ChatTemplateError, match=r"0\.01 s"), template_limits(seconds=0.01):
        render_jinja(slow, MESSAGES)
    assert render_jinja(slow, MESSAGES) == "done"  # the default limit (2 s) is enough
    with pytest.raises(ChatTemplateError, match="10 characters"), template_limits(max_chars=10):
        render_jinja("{{ 'x' * 11 }}", MESSAGES)


@settings(max_examples=100)
@given(templates())
def test_fuzz_chat_templates(tmp_path: Path, template: str) -> None:
    check_template(template, tmp_path / "pwned")


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES)
@given(templates())
def test_fuzz_chat_templates_long(tmp_path: Path, template: str) -> None:
    check_template(template, tmp_path / "pwned")
