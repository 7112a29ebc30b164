"""Guided generation on the Python API: output constraints as generation options, and chat with tools.

``llm.generate(prompt, json_schema=...)`` (or ``json_object=True``, ``regex=``, ``choice=[...]``,
``grammar=`` GBNF or Lark) constrains every completion with its own llguidance processor (``constrain``).
``llm.chat(messages, tools=[...])`` renders the tools in the model's chat format, forces a call when
``tool_choice`` is "required" or names a function, and returns a ``Completion`` whose ``tool_calls`` holds the
parsed calls (its ``text`` is the content); with ``stream=True`` it yields ``tools.Delta``s instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .sampling import SamplingParams

if TYPE_CHECKING:
    from .generate import Completion
    from .llm import LLM

CONSTRAINTS = ("json_schema", "json_object", "regex", "choice", "grammar")
TOOL_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls", "tool_format")


def request_params(llm: LLM, options: dict[str, Any]) -> Callable[[], SamplingParams]:
    """A maker of each request's SamplingParams from generation `options` (constraint options removed from
    them): every request gets its own constraint processor, as a processor follows one output."""
    from .generate import _params

    constraint = {k: options.pop(k) for k in CONSTRAINTS if k in options}
    constraint = {k: v for k, v in constraint.items() if v is not None and v is not False}
    params = _params(options)
    if not constraint:
        return lambda: params
    from .constrain import Constrainer, grammar_from

    grammar = grammar_from(**constraint)
    constrainer = Constrainer.for_tokenizer(llm.require_tokenizer(), llm.config.vocab_size)
    constrainer.compile(grammar)  # a bad constraint fails here, before anything is generated

    def make() -> SamplingParams:
        return params.replace(logits_processors=[*params.logits_processors, constrainer.processor(grammar)])

    return make


def chat_with_tools(llm: LLM, messages: list[dict[str, Any]], *, stream: bool = False, tools: Any = None,
                    tool_choice: Any = None, parallel_tool_calls: bool = True, tool_format: str | None = None,
                    **options: Any) -> Completion | Iterator[Any]:  # fmt: skip
    """``llm.chat`` with tools; see the module docstring."""
    from .generate import Completion, chat_prompt_ids, stop_token_ids, stream_events
    from .tools import ToolStream, check_messages, plan_tools

    tokenizer = llm.require_tokenizer()
    plan = plan_tools(tokenizer.chat_template or tokenizer.chat_format, tools, tool_choice, parallel_tool_calls,
                      tool_format)  # fmt: skip
    ids = chat_prompt_ids(tokenizer, check_messages(messages), **plan.render_options)
    if plan.grammar is not None:
        options["grammar"] = plan.grammar
    compile = options.pop("compile", False)
    params = request_params(llm, options)()
    events = stream_events(llm, ids, params, compile=compile)
    parser = plan.parser()
    reader = ToolStream(tokenizer, parser, stop_token_ids(tokenizer), ids[-6:]) if parser else None

    def deltas() -> Iterator[Any]:
        from .tools import Delta

        for ev in events:
            if reader is None:
                if ev.text:
                    yield Delta(content=ev.text)
                continue
            yield from reader.add(ev.token_ids)
            if ev.finished:
                yield from reader.finish()

    if stream:
        return deltas()
    tokens: list[int] = []
    text: list[str] = []
    finish = "length"
    for ev in events:
        tokens += ev.token_ids
        text.append(ev.text)
        finish = ev.finish_reason or finish
        if reader is not None:
            reader.add(ev.token_ids)
    calls = []
    if reader is not None:
        reader.finish()
        calls = parser.tool_calls  # type: ignore[union-attr]
    content = parser.content if parser is not None else "".join(text)
    if calls and finish == "stop":
        finish = "tool_calls"
    return Completion(text=content or "", token_ids=tokens, finish_reason=finish, prompt_tokens=len(ids),
                      tool_calls=calls or None)  # fmt: skip


__all__ = ["CONSTRAINTS", "TOOL_OPTIONS", "chat_with_tools", "request_params"]
