"""The Python API's generation calls, on an engine: what ``LLM.generate/stream/chat`` run.

    generate(engine, prompt, **options) -> Completion                 # prompt: str | list[int]
    generate(engine, [p1, p2, ...], **options) -> list[Completion]    # a batch, generated together
    stream_events(engine, prompt, params) -> Iterator[Event]          # closing it early cancels the request

``options`` are the fields of ``SamplingParams`` (max_new_tokens, temperature (0 = greedy), top_k, top_p, min_p,
repetition_penalty, presence_penalty, frequency_penalty, seed, stop, stop_token_ids, ignore_eos, logprobs,
prompt_logprobs, logits_processors) and at most one output constraint (``json_schema``, ``json_object=True``,
``regex``, ``choice``, ``grammar``: GBNF or Lark; ``llamaforge.constrain``), which every request follows with its
own processor. The engine keeps its KV cache between calls, so a prompt that starts like an earlier one (the same
system prompt, the previous turns of a chat) reuses that prefix's cache.

    chat_with_tools(engine, messages, tools=[...], tool_choice=..., ...) -> Completion   # .tool_calls: the calls

renders the tools in the model's chat format, forces a call when ``tool_choice`` is "required" or names a
function, and parses the calls out of the answer (``llamaforge.tools``); with ``stream=True`` it yields
``tools.Delta`` pieces (content, then each call's id and name, then its argument fragments).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..vision import Image
from ..vision.inputs import ImageLimits
from .engine import Completion, Engine, Event
from .prompts import chat_prompt, check_fits, prompt_ids
from .sampling import SamplingParams

Prompt = str | Sequence[int]
CONSTRAINTS = ("json_schema", "json_object", "regex", "choice", "grammar")
TOOL_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls", "tool_format")


def sampling_params(options: dict[str, Any]) -> SamplingParams:
    """``SamplingParams(**options)``, with unknown option names reported as a ValueError."""
    try:
        return SamplingParams(**options)
    except TypeError as exc:
        raise ValueError(f"unknown generation option: {exc}") from exc


def request_params(engine: Engine, options: dict[str, Any]) -> Callable[[], SamplingParams]:
    """A maker of each request's SamplingParams from `options` (the constraint options taken out of them): every
    request gets a processor of its own, as a processor follows one output. A bad constraint raises here."""
    constraint = {k: options.pop(k) for k in CONSTRAINTS if k in options}
    constraint = {k: v for k, v in constraint.items() if v is not None and v is not False}
    params = sampling_params(options)
    if not constraint:
        return lambda: params
    from ..constrain import Constrainer, grammar_from

    if engine.tokenizer is None:
        raise ValueError("output constraints need the model's tokenizer")
    grammar = grammar_from(**constraint)
    constrainer = Constrainer.for_tokenizer(engine.tokenizer, engine.config.vocab_size)
    constrainer.compile(grammar)

    def make() -> SamplingParams:
        return params.replace(logits_processors=[*params.logits_processors, constrainer.processor(grammar)])

    return make


def is_batch(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and not all(isinstance(t, int) for t in prompt)


def generate(engine: Engine, prompt: Prompt | Sequence[Prompt], images: Sequence[Image] | None = None,
             **options: Any) -> Completion | list[Completion]:  # fmt: skip
    """Complete one prompt (text or token ids) or a batch of them (a list of prompts -> a list of Completions,
    generated together, ``engine.max_batch`` at a time). `images`: one prompt's images, one per image placeholder
    in its ids (``prompts.image_prompt`` builds both)."""
    make_params = request_params(engine, options)
    batched = is_batch(prompt)
    if batched and images:
        raise ValueError("images go with one prompt: give a batch of prompts without images, or one prompt")
    prompts = [prompt_ids(engine.tokenizer, p) for p in (prompt if batched else [prompt])]
    for ids in prompts:
        check_fits(ids, engine.max_seq_len)
    handles = [engine.add(ids, make_params(), images=images) for ids in prompts]
    try:
        results = engine.run(handles)
    except BaseException:
        for h in handles:
            engine.forget(h)
        raise
    return results if batched else results[0]


def stream_events(engine: Engine, prompt: Prompt, params: SamplingParams | None = None,
                  images: Sequence[Image] | None = None) -> Iterator[Event]:  # fmt: skip
    """The events of one request as they come (text, token ids, logprobs; the last one carries the
    finish_reason). Errors in the prompt raise here, before the first ``next()``."""
    ids = prompt_ids(engine.tokenizer, prompt)
    check_fits(ids, engine.max_seq_len)
    handle = engine.add(ids, params or SamplingParams(), images=images)
    return _events(engine, handle)


def _events(engine: Engine, handle: int) -> Iterator[Event]:
    try:
        done = False
        while not done:
            for ev in engine.step():
                if ev.handle == handle:
                    done = ev.finished
                    yield ev
    finally:
        engine.forget(handle)  # frees the request's slot and blocks when the consumer stopped early


def stream(engine: Engine, prompt: Prompt, images: Sequence[Image] | None = None, **options: Any) -> Iterator[str]:
    """The completion of one prompt as text pieces (complete UTF-8) as they are generated."""
    return (ev.text for ev in stream_events(engine, prompt, request_params(engine, options)(), images) if ev.text)


def chat_with_tools(engine: Engine, messages: list[dict[str, Any]], *, stream: bool = False, tools: Any = None,
                    tool_choice: Any = None, parallel_tool_calls: bool = True, tool_format: str | None = None,
                    image_limits: ImageLimits | None = None, **options: Any) -> Completion | Iterator[Any]:  # fmt: skip
    """Answer a conversation with tools; see the module docstring."""
    from ..tools import Delta, ToolStream, check_messages, plan_tools

    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so it has no chat format")
    plan = plan_tools(tokenizer.chat_template or tokenizer.chat_format, tools, tool_choice, parallel_tool_calls,
                      tool_format)  # fmt: skip
    ids, images = chat_prompt(tokenizer, check_messages(messages), engine.vision, image_limits, **plan.render_options)
    if plan.grammar is not None:
        options["grammar"] = plan.grammar
    events = stream_events(engine, ids, request_params(engine, options)(), images)
    parser = plan.parser()
    reader = ToolStream(tokenizer, parser, engine.stop_ids, ids[-6:]) if parser is not None else None

    def deltas() -> Iterator[Any]:
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
        calls = reader.parser.tool_calls
    content = reader.parser.content if calls else "".join(text)  # no calls: the text as any answer has it
    if calls and finish == "stop":
        finish = "tool_calls"
    return Completion(text=content or "", token_ids=tokens, finish_reason=finish, prompt_tokens=len(ids),
                      tool_calls=calls or None)  # fmt: skip
