"""Prompts into token ids, and the one check that a prompt leaves room to generate.

Every entry point (``LLM.generate/stream/chat``, the engine, the CLI, the server) encodes prompts and checks
their length here, so a prompt that does not fit gets the same ``PromptTooLongError`` (a ValueError) with the
same message everywhere; the server answers it with 400 ``context_length_exceeded``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..tokenizer import Tokenizer


class PromptTooLongError(ValueError):
    """A prompt that leaves no room to generate in the context."""

    def __init__(self, n_prompt: int, limit: int) -> None:
        super().__init__(f"the prompt has {n_prompt} tokens, which leaves no room to generate in the context of "
                         f"{limit} tokens; shorten the prompt")  # fmt: skip
        self.n_prompt, self.limit = n_prompt, limit


def check_fits(ids: Sequence[int], limit: int) -> None:
    """Raise ``PromptTooLongError`` unless at least one token can be generated after `ids` within `limit`."""
    if len(ids) >= limit:
        raise PromptTooLongError(len(ids), limit)


def check_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """The prompt ids as ints, or a ValueError naming the problem (empty, an id outside the vocabulary)."""
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    out = [int(t) for t in ids]
    bad = next((t for t in out if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    return out


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """A plain-text prompt's ids, with a BOS token when the tokenizer's model expects one."""
    return list(tokenizer.encode(text, bos=tokenizer.add_bos_default and tokenizer.bos_id is not None))


def chat_prompt_ids(tokenizer: Tokenizer | None, messages: list[dict[str, Any]], **kw: Any) -> list[int]:
    """A conversation in the model's chat format, ending with the assistant's turn header."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so it has no chat format")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError('messages must be a list of {"role": ..., "content": ...} dicts')
    return list(tokenizer.encode_chat(messages, add_generation_prompt=True, **kw))


def infill_prompt_ids(tokenizer: Tokenizer | None, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
    """The fill-in-the-middle prompt whose completion is the text between `prefix` and `suffix` (Code Llama's
    ``<PRE> prefix <SUF>suffix <MID>``, or the FIM tokens a vocabulary declares)."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so it cannot build an infilling prompt")
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise ValueError(f"infilling takes a text prefix and suffix, got {type(prefix).__name__} and "
                         f"{type(suffix).__name__}")  # fmt: skip
    return list(tokenizer.encode_infill(prefix, suffix, suffix_first=suffix_first))


def prompt_ids(tokenizer: Tokenizer | None, prompt: str | Sequence[int]) -> list[int]:
    """A prompt's token ids: text is encoded with the model's tokenizer, ids are kept."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of text")
        return encode_prompt(tokenizer, prompt)
    if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")


def stop_token_ids(tokenizer: Tokenizer | None) -> set[int]:
    """The tokenizer's end-of-turn/end-of-text ids."""
    return set() if tokenizer is None else {int(i) for i in tokenizer.stop_ids}
