"""Chat prompt formats: Llama 2 ``[INST] <<SYS>>``, Llama 3 and 4 headers, Code Llama Instruct, jinja templates.

``format_chat(messages, template)`` returns the prompt text. ``render_chat`` returns the same text as
parts ``(text, allow_special)``, split where the format's reference implementation encodes separately, so
that ``Tokenizer.encode_chat`` gives token for token what Meta's code gives (the content of a message is
ordinary text there, even if it spells a special token). A jinja template renders to one part whose
special-token text is parsed, as ``transformers``' ``apply_chat_template(tokenize=True)`` does.

Templates come from model files, so they are untrusted: they run in jinja2's ImmutableSandboxedEnvironment
with the same extras as transformers (``raise_exception``, ``strftime_now``, a ``tojson`` that does not
escape HTML, ``{% generation %}``, loop controls). Reaching for an unsafe attribute (``__class__``,
``__subclasses__``, ...) raises ``ChatTemplateError`` at once instead of rendering an empty string.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

NAMED_FORMATS = ("llama2", "llama3", "llama4", "codellama")
Part = tuple[str, bool]  # (text, whether special-token text in it is parsed)


class ChatTemplateError(ValueError):
    """A chat template that cannot be rendered: a syntax error, its own raise_exception, or a sandbox violation."""


def format_chat(
    messages: list[dict[str, Any]], template: str = "llama3", add_generation_prompt: bool = True, **kwargs: Any
) -> str:
    """The prompt text for `messages` in `template`: a named format (see NAMED_FORMATS) or a jinja template.

    Keyword arguments reach a jinja template as variables (``bos_token``, ``eos_token``, ``tools``, ...).
    """
    return "".join(text for text, _ in render_chat(messages, template, add_generation_prompt, **kwargs))


def render_chat(
    messages: list[dict[str, Any]], template: str = "llama3", add_generation_prompt: bool = True, **kwargs: Any
) -> list[Part]:
    """The prompt as parts (see the module docstring). ``tools`` (OpenAI function definitions) are written in
    the format's own way (``llamaforge.tools``); ``tool_format`` picks "json" or "pythonic" calls for the
    llama3/llama4 formats, whose tool prompt also takes ``date_string`` and ``tools_in_user_message``."""
    _check_messages(messages)
    tools, tool_format = kwargs.pop("tools", None), kwargs.pop("tool_format", None)
    image_token = kwargs.get("image_token")  # an image model's placeholder; a jinja template sees it as a variable
    # a named format's own jinja form (what `convert --to hf` writes) is that format, tool calling included
    template = _named_format_of(template)
    if template in ("llama2", "codellama"):
        if tools:
            raise ValueError(f"the {template} chat format has no tool calling; use a template that takes tools")
        if any(_is_image(c) for m in messages if isinstance(m.get("content"), list) for c in m["content"]):
            raise ValueError(f"the {template} chat format has no place for images")
        return _llama2(messages, add_generation_prompt)
    if template in ("llama3", "llama4"):
        generation = 3 if template == "llama3" else 4
        if tools or tool_format or _tool_messages(messages):
            from . import tools as T

            in_user = kwargs.get("tools_in_user_message", True)
            messages = T.meta_messages(T.check_messages(messages), T.parse_tools(tools), generation, tool_format,
                                       kwargs.get("date_string"), in_user)  # fmt: skip
        if generation == 3:
            return _headers(messages, add_generation_prompt, "<|start_header_id|>", "<|end_header_id|>", "_id|>", 3,
                            image_token)  # fmt: skip
        return _headers(messages, add_generation_prompt, "<|header_start|>", "<|header_end|>", "|>", 4, image_token)
    if "{" not in template:
        raise ValueError(
            f"unknown chat format {template!r}; choose one of {', '.join(NAMED_FORMATS)} or a jinja template"
        )
    if tools or _tool_messages(messages):
        from . import tools as T

        messages, kwargs["tools"] = T.template_messages(messages, T.parse_tools(tools), template)
    return [(render_jinja(template, messages, add_generation_prompt=add_generation_prompt, **kwargs), True)]


def _tool_messages(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise ValueError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    for n, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{n}] must be a dict with a 'role' string, got {m!r}")


def _is_image(part: Any) -> bool:
    """An image part of a message's content, as HF's templates take it (``{"type": "image"}``)."""
    return isinstance(part, Mapping) and part.get("type") == "image"


def _text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(c.get("text", "") if isinstance(c, Mapping) else str(c) for c in content)
    return str(content)


# --- Llama 2 and Code Llama Instruct (Meta's chat_completion) -----------------------------------------
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def _llama2(messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[Part]:
    turns = [{"role": m["role"], "content": _text(m)} for m in messages]
    if turns and turns[0]["role"] == "system":
        if len(turns) < 2:
            raise ValueError("llama2 chat format: a system message must be followed by a user message")
        first = turns[1]
        turns = [{"role": first["role"], "content": B_SYS + turns[0]["content"] + E_SYS + first["content"]}, *turns[2:]]
    for n, turn in enumerate(turns):
        expected = "user" if n % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise ValueError(
                f"llama2 chat format: roles must alternate user/assistant (after an optional system "
                f"message); message {n} is {turn['role']!r}"
            )
    parts: list[Part] = []
    for prompt, answer in zip(turns[::2], turns[1::2]):
        text = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        parts += [("<s>", True), (text, False), ("</s>", True)]
    if len(turns) % 2:
        if not add_generation_prompt:
            raise ValueError(
                "llama2 chat format: a conversation that ends with a user message always ends "
                "with the prompt for the answer; add_generation_prompt=False needs an assistant last"
            )
        parts += [("<s>", True), (f"{B_INST} {turns[-1]['content'].strip()} {E_INST}", False)]
    return parts


# --- Llama 3 and Llama 4 (Meta's ChatFormat) --------------------------------------------------------
def _headers(
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    start: str,
    end: str,
    suffix: str,
    generation: int,
    image_token: str | None = None,
) -> list[Part]:
    eot, eom = f"<|eot{suffix}", f"<|eom{suffix}"

    def header(role: str) -> list[Part]:
        return [(start, True), ("ipython" if role == "tool" else role, False), (end, True), ("\n\n", False)]

    parts: list[Part] = [("<|begin_of_text|>", True)]
    for m in messages:
        parts += header(m["role"])
        if "parts" in m:  # written out by llamaforge.tools (tool prompts and calls), end token included
            parts += m["parts"]
            continue
        content = m.get("content")
        items = content if isinstance(content, list) else [content]
        for c in items:
            if _is_image(c):  # Meta's ChatFormat writes an image as its special token where the image is
                if not image_token:
                    raise ValueError("an image in the conversation needs an image model (it has no image token)")
                parts.append((image_token, True))
            else:
                parts.append(
                    (_text({"content": [c]}) if isinstance(c, Mapping) else ("" if c is None else str(c)), False)
                )
        # End of message (<|eom|>) instead of end of turn: the model expects a tool result next.
        ends_message = m.get("stop_reason") == "end_of_message" or bool(m.get("eom"))
        if generation == 4 and m["role"] == "tool":
            ends_message = True
        parts.append((eom if m["role"] in ("assistant", "tool") and ends_message else eot, True))
    if add_generation_prompt:
        parts += header("assistant")
    return parts


# --- the named formats as jinja templates (for exports that other engines read) -----------------------------
_TEXT_MACRO = (
    "{%- macro text(m) -%}{%- if m['content'] is string -%}{{ m['content'] }}{%- elif m['content'] is not none -%}"
    "{%- for c in m['content'] -%}{%- if c is mapping -%}{{ c.get('text', '') }}{%- else -%}{{ c }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{%- endmacro -%}"
)
_HEADERS_TEMPLATE = (
    _TEXT_MACRO + "{{- '<|begin_of_text|>' }}{%- for m in messages %}"
    "{{- '{start}' + ('ipython' if m['role'] == 'tool' else m['role']) + '{end}\n\n' + text(m) }}"
    "{%- if m['role'] in ['assistant', 'tool'] and ({tool_eom}m.get('stop_reason') == 'end_of_message' or m.get('eom'))"
    " %}{{- '{eom}' }}{%- else %}{{- '{eot}' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '{start}assistant{end}\n\n' }}{%- endif %}"
)
_LLAMA2_TEMPLATE = (
    _TEXT_MACRO + "{%- set turns = messages %}{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- if messages | length < 2 %}{{ raise_exception('llama2 chat format: a system message must be followed by a "
    "user message') }}{%- endif %}{%- set turns = [{'role': messages[1]['role'], 'content': '<<SYS>>\n' + "
    "text(messages[0]) + '\n<</SYS>>\n\n' + text(messages[1])}] + messages[2:] %}{%- endif %}"
    "{%- for t in turns %}{%- if t['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') %}"
    "{{ raise_exception('llama2 chat format: roles must alternate user/assistant (after an optional system "
    "message)') }}{%- endif %}{%- if loop.index0 % 2 == 0 %}"
    "{%- if loop.last and not add_generation_prompt %}{{ raise_exception('llama2 chat format: a conversation that "
    "ends with a user message always ends with the prompt for the answer') }}{%- endif %}"
    "{{- '<s>[INST] ' + text(t) | trim + ' [/INST]' }}{%- else %}{{- ' ' + text(t) | trim + ' </s>' }}{%- endif %}"
    "{%- endfor %}"
)


@lru_cache(maxsize=1)
def _named_templates() -> dict[str, str]:
    return {named_template(name): name for name in reversed(NAMED_FORMATS)}  # llama2 before codellama


def _named_format_of(template: str) -> str:
    return _named_templates().get(template, template) if "{" in template else template


def named_template(name: str) -> str:
    """A jinja chat template that renders named format ``name`` to the same text as ``format_chat``, for model
    directories read by other engines (transformers, vLLM, llama.cpp), which know templates, not names."""
    if name in ("llama2", "codellama"):
        return _LLAMA2_TEMPLATE
    marks = {  # header start, header end, end of turn, end of message, when a message always ends with the latter
        "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", ""),
        "llama4": ("<|header_start|>", "<|header_end|>", "<|eot|>", "<|eom|>", "m['role'] == 'tool' or "),
    }
    if name not in marks:
        raise ValueError(f"unknown chat format {name!r}; choose one of {', '.join(NAMED_FORMATS)}")
    start, end, eot, eom, tool_eom = marks[name]
    template = _HEADERS_TEMPLATE
    for key, value in (("{start}", start), ("{end}", end), ("{eot}", eot), ("{eom}", eom), ("{tool_eom}", tool_eom)):
        template = template.replace(key, value)
    return template


# --- jinja templates ----------------------------------------------------------------------------------
def render_jinja(
    template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any
) -> str:
    """Render a Hugging Face style chat template in the sandbox, with transformers' variables."""
    import jinja2

    compiled = _compile(template)
    context = {
        "messages": _plain(messages),
        "add_generation_prompt": add_generation_prompt,
        "tools": None,
        "documents": None,
    }
    context.update({k: _plain(v) for k, v in variables.items()})
    seconds, max_chars = _LIMITS.get()
    try:
        with _deadline(seconds):
            parts, size = [], 0
            for part in compiled.generate(**context):
                size += len(part)
                if size > max_chars:
                    raise ChatTemplateError(f"chat template output is longer than the limit of {max_chars} characters")
                parts.append(part)
            return "".join(parts)
    except jinja2.exceptions.SecurityError as exc:
        raise ChatTemplateError(f"chat template blocked by the sandbox: {exc}") from None
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template error: {exc}") from None
    except (
        TypeError,
        ValueError,
        AttributeError,
        LookupError,
        ArithmeticError,
        RuntimeError,
        MemoryError,
        AssertionError,
    ) as exc:  # jinja's filters assert on some arguments: truncate(0)
        if isinstance(exc, ChatTemplateError):
            raise
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from None


# --- limits on rendering --------------------------------------------------------------------------------
TIME_LIMIT = 2.0  # seconds a template may take to render (real templates take milliseconds)
_MAX_SIZE = 10_000_000  # longest string or list a template may build or output (a sandboxed template must not OOM us)
_LIMITS: ContextVar[tuple[float, int]] = ContextVar("chat_template_limits", default=(TIME_LIMIT, _MAX_SIZE))


@contextmanager
def template_limits(seconds: float | None = None, max_chars: int | None = None) -> Iterator[None]:
    """Bound the time (seconds) and output size (characters) of the jinja templates rendered inside the block
    (defaults ``TIME_LIMIT``, 10M characters); the server sets ``--template-timeout`` this way."""
    old_seconds, old_chars = _LIMITS.get()
    token = _LIMITS.set((old_seconds if seconds is None else seconds, old_chars if max_chars is None else max_chars))
    try:
        yield
    finally:
        _LIMITS.reset(token)


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Stop a template that runs past `seconds`: a trace function checks the clock on every line of the compiled
    template (a loop that calls nothing) and on every Python call made while rendering (filters, macros, tests)."""
    end = time.monotonic() + seconds

    def check() -> None:
        if time.monotonic() > end:
            raise ChatTemplateError(f"chat template took longer than the limit of {seconds:g} s to render")

    def on_line(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            check()
        return on_line

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        # Only the template's own frames and jinja's are stopped: an exception raised in a frame of someone else's
        # (a gc callback, a __del__) would be swallowed there, and a trace function that raises is switched off.
        name = frame.f_code.co_filename
        if event == "call" and (name == "<template>" or "jinja2" in name):
            check()
            if name == "<template>":
                return on_line
        return None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


def _plain(value: Any) -> Any:
    """Plain JSON-like data only, so the template never sees an object with methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


_BIG_NUMBER = re.compile(r"\d{8,}")  # a width of 10M+ in a format string


def _check_call(what: str, args: tuple, kwargs: dict) -> None:
    """Refuse a call (function, method, macro or filter) that would build something over the size limit: a huge
    int argument (``"x"|center(10**9)``), a long string argument (a macro doubling its input each time) or a
    format string with a huge width."""
    import jinja2

    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_SIZE:
            raise jinja2.exceptions.SecurityError(f"{what}: argument {value} is too large")
        if isinstance(value, (str, list, tuple, dict)) and len(value) > _MAX_SIZE:
            raise jinja2.exceptions.SecurityError(f"{what}: an argument of {len(value)} items is too large")


def _checked_filter(name: str, fn: Any) -> Any:
    import functools

    import jinja2

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        _check_call(f"filter {name!r}", args[1:] if args and isinstance(args[0], (jinja2.runtime.Context,
                    jinja2.nodes.EvalContext, jinja2.Environment)) else args, kwargs)  # fmt: skip
        if name == "format" and args and isinstance(args[0], str) and _BIG_NUMBER.search(args[0]):
            raise jinja2.exceptions.SecurityError("a format string with a huge width is not allowed")
        return fn(*args, **kwargs)

    return checked


@lru_cache(maxsize=32)
def _compile(template: str) -> Any:
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            raise jinja2.exceptions.SecurityError(f"access to {attribute!r} of a {type(obj).__name__} is not allowed")

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            name = getattr(__obj, "__name__", type(__obj).__name__)
            _check_call(name, args, kwargs)
            owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # the sandbox wraps str.format
            if name in ("format", "format_map") and isinstance(owner, str) and _BIG_NUMBER.search(owner):
                raise jinja2.exceptions.SecurityError("a format string with a huge width is not allowed")
            return super().call(__context, __obj, *args, **kwargs)

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            power = operator == "**" and isinstance(right, int) and isinstance(left, (int, float))
            if power and (abs(right) > 64 or (isinstance(left, int) and int(left).bit_length() * right > 4096)):
                raise jinja2.exceptions.SecurityError(f"exponent {right} is too large")
            if operator == "*":
                size = next(
                    (
                        len(x) * y
                        for x, y in ((left, right), (right, left))
                        if isinstance(x, (str, list, tuple)) and isinstance(y, int)
                    ),
                    0,
                )
                if size > _MAX_SIZE:
                    raise jinja2.exceptions.SecurityError(f"repetition to {size} items is too large")
            return super().call_binop(context, operator, left, right)

    class GenerationTag(Extension):  # transformers' {% generation %}...{% endgeneration %}: renders its body
        tags = frozenset({"generation"})

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            _check_call(f"namespace attribute {name!r}", (value,), {})
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    def make_dict(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return dict(*args, **kwargs)

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    for name, fn in list(env.filters.items()):  # filters are called directly, not through Environment.call
        env.filters[name] = _checked_filter(name, fn)
    env.globals.pop("lipsum", None)  # lorem ipsum of any length: of no use to a chat template
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace, dict=make_dict)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template syntax error at line {exc.lineno}: {exc.message}") from None


__all__ = ["NAMED_FORMATS", "TIME_LIMIT", "ChatTemplateError", "format_chat", "named_template", "render_chat",
           "render_jinja", "template_limits"]  # fmt: skip
