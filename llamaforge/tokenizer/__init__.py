"""Tokenizers for every LLaMA-family format behind one interface, the ``Tokenizer`` protocol.

``load_tokenizer(source)`` reads a SentencePiece ``tokenizer.model`` (LLaMA 1/2, Code Llama), a tiktoken
``tokenizer.model`` (Llama 3 and 4, with Meta's pre-tokenizer pattern and special tokens), a Hugging Face
``tokenizer.json``, or the vocabulary inside a GGUF file (``backends.py``; file-format helpers in
``formats.py``). Each backend is the field's own library, so the ids are those of the model's reference
tokenizer.

Text is ordinary text unless ``allow_special=True``: a user typing ``<|eot_id|>`` gets the tokens of
those characters. Bytes are accepted too; invalid UTF-8 becomes U+FFFD (one per bad byte, like llama.cpp)
and lone surrogates become U+FFFD, so encoding never fails on odd input.

Generation (``llamaforge.inference``) needs only the ``Tokenizer`` protocol below; every backend implements it
through ``base.BaseTokenizer``, whose ``decoder()`` is the one incremental detokenizer (complete UTF-8 pieces,
optionally primed with the ids before the stream).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from .backends import HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, load_tokenizer, split_long_runs
from .base import BaseTokenizer, TextDecoder, clean_text


@runtime_checkable
class IncrementalDecoder(Protocol):
    def add(self, token_id: int) -> str:
        """The text that `token_id` completes (possibly ""): whole characters only."""
        ...

    def flush(self) -> str:
        """What is left at the end of the stream."""
        ...


@runtime_checkable
class Tokenizer(Protocol):
    """What generation, the server and the chat formats use from a tokenizer."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    stop_ids: set[int]  # end-of-turn / end-of-text ids: generation stops at them
    add_bos_default: bool  # whether plain-text prompts start with BOS

    def encode(
        self, text: str | bytes, bos: bool = False, eos: bool = False, allow_special: bool = False
    ) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str: ...

    def decoder(self, skip_special: bool = False, context: Sequence[int] = ()) -> IncrementalDecoder: ...

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kw: Any
    ) -> list[int]: ...

    def encode_infill(self, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]: ...

    def id_to_piece(self, token_id: int) -> str: ...


__all__ = [
    "BaseTokenizer",
    "HFTokenizer",
    "IncrementalDecoder",
    "SentencePieceTokenizer",
    "TextDecoder",
    "TiktokenTokenizer",
    "Tokenizer",
    "clean_text",
    "load_tokenizer",
    "split_long_runs",
]
