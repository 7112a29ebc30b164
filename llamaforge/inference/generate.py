"""The Python API's generation calls, on an engine: what ``LLM.generate/stream/chat`` run.

    generate(engine, prompt, **options) -> Completion                 # prompt: str | list[int]
    generate(engine, [p1, p2, ...], **options) -> list[Completion]    # a batch, generated together
    stream_events(engine, prompt, params) -> Iterator[Event]          # closing it early cancels the request

``options`` are the fields of ``SamplingParams`` (max_new_tokens, temperature (0 = greedy), top_k, top_p, min_p,
repetition_penalty, presence_penalty, frequency_penalty, seed, stop, stop_token_ids, ignore_eos, logprobs,
prompt_logprobs, logits_processors). The engine keeps its KV cache between calls, so a prompt that starts like
an earlier one (the same system prompt, the previous turns of a chat) reuses that prefix's cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .engine import Completion, Engine, Event
from .prompts import check_fits, prompt_ids
from .sampling import SamplingParams

Prompt = str | Sequence[int]


def sampling_params(options: dict[str, Any]) -> SamplingParams:
    """``SamplingParams(**options)``, with unknown option names reported as a ValueError."""
    try:
        return SamplingParams(**options)
    except TypeError as exc:
        raise ValueError(f"unknown generation option: {exc}") from exc


def is_batch(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and not all(isinstance(t, int) for t in prompt)


def generate(engine: Engine, prompt: Prompt | Sequence[Prompt], **options: Any) -> Completion | list[Completion]:
    """Complete one prompt (text or token ids) or a batch of them (a list of prompts -> a list of Completions,
    generated together, ``engine.max_batch`` at a time)."""
    params = sampling_params(options)
    batched = is_batch(prompt)
    prompts = [prompt_ids(engine.tokenizer, p) for p in (prompt if batched else [prompt])]
    for ids in prompts:
        check_fits(ids, engine.max_seq_len)
    handles = [engine.add(ids, params) for ids in prompts]
    try:
        results = engine.run(handles)
    except BaseException:
        for h in handles:
            engine.forget(h)
        raise
    return results if batched else results[0]


def stream_events(engine: Engine, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[Event]:
    """The events of one request as they come (text, token ids, logprobs; the last one carries the
    finish_reason). Errors in the prompt raise here, before the first ``next()``."""
    ids = prompt_ids(engine.tokenizer, prompt)
    check_fits(ids, engine.max_seq_len)
    handle = engine.add(ids, params or SamplingParams())
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


def stream(engine: Engine, prompt: Prompt, **options: Any) -> Iterator[str]:
    """The completion of one prompt as text pieces (complete UTF-8) as they are generated."""
    return (ev.text for ev in stream_events(engine, prompt, sampling_params(options)) if ev.text)
