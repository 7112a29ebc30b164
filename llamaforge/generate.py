"""Generation's import path from before ``llamaforge.inference`` (where the engine lives): the ``LLM``-first calls.

``generate(llm, prompt, **options)``, ``stream(llm, ...)`` and ``chat(llm, messages, ...)`` are
``llm.generate/stream/chat``; ``Engine``, ``SamplingParams`` and the result types are ``llamaforge.inference``'s.
"""

from __future__ import annotations

from typing import Any

from .inference import (
    PREFILL_BUDGET,
    Completion,
    Engine,
    Event,
    SamplingParams,
    TokenLogprob,
    chat_prompt_ids,
    encode_prompt,
)


def generate(llm: Any, prompt: Any, **options: Any) -> Any:
    return llm.generate(prompt, **options)


def stream(llm: Any, prompt: Any, **options: Any) -> Any:
    return llm.stream(prompt, **options)


def chat(llm: Any, messages: list[dict[str, Any]], **options: Any) -> Any:
    return llm.chat(messages, **options)


__all__ = ["PREFILL_BUDGET", "Completion", "Engine", "Event", "SamplingParams", "TokenLogprob", "chat",
           "chat_prompt_ids", "encode_prompt", "generate", "stream"]  # fmt: skip
