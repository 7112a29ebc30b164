"""Constrained decoding with llguidance: JSON schemas, regular expressions, choices and grammars.

``grammar_from(json_schema=..., regex=..., choice=..., grammar=...)`` turns one constraint into an llguidance
grammar (JSON schemas with the ``strict``-mode keywords and more; ``json_object`` is ``{"type": "object"}``;
a grammar is Lark as llguidance reads it, or GBNF as llama.cpp's ``grammar`` field takes it). Bad input raises
``GrammarError`` naming the problem: the unsupported keyword, or the position where a grammar fails to parse.

``Constrainer.for_tokenizer(tokenizer, vocab_size)`` holds what llguidance needs to know about a vocabulary
(built once per tokenizer from its own library's data: the ``tokenizers`` JSON, tiktoken's ranks, or the
SentencePiece pieces) and compiles grammars into ``GrammarProcessor``s, the per-request logits processors that
the engine calls before each token is sampled (``SamplingParams.logits_processors``). A processor feeds the
tokens generated so far to its matcher and masks every token that cannot come next; once the grammar is
complete only the end-of-turn tokens remain. Compiled grammars are cached per grammar text, so a schema pays
its compilation once and later requests start from a copy.

JSON is written compactly (``", "`` and ``": "`` separators, no other whitespace) unless the schema's own
``x-guidance`` options say otherwise: a small model given free whitespace can spend its whole budget on it.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
_CACHE_SIZE = 64


class GrammarError(ValueError):
    """A schema, regex, choice list or grammar that cannot be used; the message says what and where."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def grammar_from(*, json_schema: Any = None, json_object: bool = False, regex: str | None = None,
                 choice: Sequence[str] | None = None, grammar: str | None = None,
                 param: str | None = None) -> str:  # fmt: skip
    """The llguidance grammar for exactly one of the constraints (``param`` labels errors)."""
    from llguidance import LLMatcher

    options = {"json_schema": json_schema, "regex": regex, "choice": choice, "grammar": grammar}
    given = [n for n, v in options.items() if v is not None] + (["json_object"] if json_object else [])
    if len(given) != 1:
        raise GrammarError(f"give exactly one constraint, got {', '.join(given) or 'none'}", param)
    if json_object:
        json_schema = {"type": "object"}
    if json_schema is not None:
        schema = _load_schema(json_schema, param)
        return LLMatcher.grammar_from_json_schema(schema, defaults=dict(JSON_LAYOUT))  # type: ignore[arg-type]
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            raise GrammarError("the regex must be a non-empty string", param)
        return LLMatcher.grammar_from_regex(regex)
    if choice is not None:
        if isinstance(choice, str) or not choice or not all(isinstance(c, str) and c for c in choice):
            raise GrammarError("the choice must be a non-empty list of non-empty strings", param)
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choice))
    return LLMatcher.grammar_from_lark(_to_lark(grammar, param))


def _load_schema(schema: Any, param: str | None) -> dict[str, Any]:
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise GrammarError(f"the JSON schema is not valid JSON: {exc}", param) from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, Mapping):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}", param)
    return dict(schema)


def _to_lark(grammar: Any, param: str | None) -> str:
    """Lark as it is; GBNF (rules written ``name ::= ...``, with a ``root`` rule) converted by llguidance."""
    from llguidance.gbnf_to_lark import any_to_lark

    if not isinstance(grammar, str) or not grammar.strip():
        raise GrammarError("the grammar must be a non-empty string (Lark, or GBNF with a 'root' rule)", param)
    try:
        return any_to_lark(grammar)
    except Exception as exc:  # llguidance raises plain Exceptions for GBNF errors
        raise GrammarError(f"the grammar does not parse: {exc}", param) from None


def lark_for_json_schema(schema: Any) -> str:
    """A Lark rule body that accepts JSON following `schema` (for embedding in a larger grammar)."""
    schema = _load_schema(schema, None)
    schema.setdefault("x-guidance", dict(JSON_LAYOUT))
    return "%json " + json.dumps(schema)


# The vocabulary as llguidance sees it ---------------------------------------------------------------------------
class _PieceVocab:
    """What llguidance's TokenizerWrapper protocol asks of a tokenizer, for a SentencePiece model: each token's
    bytes (special tokens marked with a leading 0xFF, as llguidance expects)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        tokens = []
        for i in range(tokenizer.vocab_size):
            piece = tokenizer.id_to_piece(i)
            if tokenizer.is_special(i):
                tokens.append(b"\xff" + piece.encode())
            elif _BYTE_PIECE.fullmatch(piece):
                tokens.append(bytes([int(piece[3:5], 16)]))
            else:
                tokens.append(piece.replace("\u2581", " ").encode())
        self.tokens = tokens + [b""] * (vocab_size - len(tokens))
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.special_tokens.values())
        # llguidance tokenizes text that a grammar forces, and expects no dummy-prefix space in front of it
        import sentencepiece as spm

        from .tokenizer.formats import sp_proto_without_dummy_prefix

        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(sp_proto_without_dummy_prefix(tokenizer.model_proto))

    def __call__(self, text: str | bytes) -> list[int]:
        return self._sp.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _ll_tokenizer(tokenizer: Any, vocab_size: int, eos: list[int]) -> Any:
    import llguidance

    kind = getattr(tokenizer, "kind", "")
    if kind == "huggingface":
        return llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos)
    if kind == "tiktoken":
        from llguidance.tiktoken import lltokenizer_from_encoding

        return lltokenizer_from_encoding(tokenizer.enc, n_vocab=vocab_size, eos_token=eos)
    if kind == "sentencepiece":
        wrapper = llguidance.TokenizerWrapper(_PieceVocab(tokenizer, vocab_size))
        return llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=eos)
    raise GrammarError(f"constrained decoding needs a llamaforge tokenizer, got {type(tokenizer).__name__}")


class Constrainer:
    """Grammars compiled for one tokenizer; shared by every request (thread-safe)."""

    _by_tokenizer: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        stop = getattr(tokenizer, "stop_ids", None) or [tokenizer.eos_id]
        self.stop_ids = sorted(int(i) for i in stop if i is not None and 0 <= i < vocab_size)
        self.vocab_size = vocab_size
        self.ll_tokenizer = _ll_tokenizer(tokenizer, vocab_size, self.stop_ids)
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._cache_lock = threading.Lock()

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, vocab_size: int) -> Constrainer:
        """The Constrainer of `tokenizer` (built once: a pass over the vocabulary, under a second)."""
        with cls._lock:
            found = cls._by_tokenizer.get(tokenizer)
            if found is None or found.vocab_size != vocab_size:
                found = cls(tokenizer, vocab_size)
                cls._by_tokenizer[tokenizer] = found
            return found

    def compile(self, grammar: str, param: str | None = None) -> Any:
        """A fresh matcher for `grammar` (from the cache when it was compiled before); GrammarError if invalid."""
        from llguidance import LLMatcher

        with self._cache_lock:
            template = self._compiled.get(grammar)
            if template is not None:
                self._compiled.move_to_end(grammar)
                return template.deep_copy()
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if is_error:
            raise GrammarError(_describe(messages[0] if messages else "invalid grammar"), param)
        template = LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if template.is_error():
            raise GrammarError(_describe(template.get_error()), param)
        with self._cache_lock:
            self._compiled[grammar] = template
            if len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
        return template.deep_copy()

    def processor(self, grammar: str, param: str | None = None) -> GrammarProcessor:
        return GrammarProcessor(self.compile(grammar, param), self.vocab_size, self.stop_ids)


def _describe(message: str) -> str:
    message = message.strip()
    if message.startswith("Unimplemented keys"):
        return f"unsupported JSON schema keyword(s): {message.split(':', 1)[1].strip()}"
    return message


def _bit(i: int) -> int:
    return -(1 << 31) if i == 31 else 1 << i  # the int32 word with bit i set (bit 31 is the sign bit)


def _unpack(bitmask: Tensor, vocab_size: int) -> np.ndarray:
    # Token t is bit t % 32 of word t // 32: bit t % 8 of byte t // 8 in little-endian order. numpy does this
    # in one single-threaded pass (a batch's masks are too small to be worth torch's thread pool).
    data = bitmask.contiguous().numpy().astype("<i4", copy=False).view(np.uint8)
    return np.unpackbits(data, axis=-1, bitorder="little")[..., :vocab_size].view(bool)


def unpack_bitmask(bitmask: Tensor, vocab_size: int, device: torch.device) -> Tensor:
    """llguidance's int32 bitmask [..., ceil(V/32)] as a bool mask [..., V] (True: allowed) on `device`."""
    return torch.from_numpy(_unpack(bitmask, vocab_size)).to(device)


class GrammarProcessor:
    """A request's logits processor: ``processor(output_ids, logits[V]) -> logits`` with the tokens the
    grammar rules out at -inf. Call it once per step, with the request's output so far."""

    def __init__(self, matcher: Any, vocab_size: int, stop_ids: Sequence[int]) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.stop_ids = list(stop_ids)
        self.seen = 0

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() or None if self.matcher.is_error() else None

    def accepting(self) -> bool:
        """Whether the output so far is complete under the grammar."""
        return bool(self.matcher.is_accepting())

    def advance(self, output_ids: Sequence[int]) -> None:
        new = [int(t) for t in output_ids[self.seen :]]
        self.seen = len(output_ids)
        if new and not self.matcher.is_error():
            self.matcher.consume_tokens(new)

    def mask(self, output_ids: Sequence[int], device: torch.device) -> Tensor:
        """The tokens allowed next, [V] bool."""
        words = torch.zeros((self.vocab_size + 31) // 32, dtype=torch.int32)
        self._fill(output_ids, words)
        return unpack_bitmask(words, self.vocab_size, device)

    def __call__(self, output_ids: list[int], logits: Tensor) -> Tensor:
        return GrammarProcessor.apply_batch([(0, self, output_ids)], logits.unsqueeze(0))[0]

    def _fill(self, output_ids: Sequence[int], words: Tensor) -> None:
        """Write the next-token bitmask into `words` (int32 [ceil(V/32)])."""
        self.advance(output_ids)
        if self.matcher.is_error():  # cannot happen with our own masks; end the answer rather than run wild
            words.zero_()
            for t in self.stop_ids:
                words[t // 32] |= _bit(t % 32)
            return
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    @staticmethod
    def apply_batch(items: Sequence[tuple[int, GrammarProcessor, Sequence[int]]], logits: Tensor) -> Tensor:
        """Mask rows of logits [B, V] at once: one unpack and one fill for all constrained rows of a step (the
        engine calls this instead of one processor call per row)."""
        vocab = max(p.vocab_size for _, p, _ in items)
        words = torch.zeros(len(items), (vocab + 31) // 32, dtype=torch.int32)
        for k, (_, proc, ids) in enumerate(items):
            proc._fill(ids, words[k])
        rows = [i for i, _, _ in items]
        n = logits.shape[-1]
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
            allowed = _unpack(words, vocab)[:, :n]
            values = logits.numpy()  # shares memory with logits (a copy the engine made for the processors)
            for k, row in enumerate(rows):
                values[row, : allowed.shape[1]][~allowed[k]] = -np.inf
                values[row, allowed.shape[1] :] = -np.inf  # ids past the grammar's vocabulary
            return logits
        banned = ~unpack_bitmask(words, vocab, logits.device)
        if n > vocab:
            banned = torch.cat([banned, banned.new_ones(len(items), n - vocab)], dim=-1)
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill(banned[:, :n], float("-inf"))
        return logits


def constraint_processor(tokenizer: Any, vocab_size: int, *, json_schema: Any = None, json_object: bool = False,
                         regex: str | None = None, choice: Sequence[str] | None = None,
                         grammar: str | None = None, param: str | None = None) -> GrammarProcessor:  # fmt: skip
    """A processor for one constraint (see ``grammar_from``) on `tokenizer`'s vocabulary."""
    if tokenizer is None:
        raise GrammarError("constrained decoding needs the model's tokenizer", param)
    text = grammar_from(json_schema=json_schema, json_object=json_object, regex=regex, choice=choice,
                        grammar=grammar, param=param)  # fmt: skip
    return Constrainer.for_tokenizer(tokenizer, vocab_size).processor(text, param)


__all__ = [
    "JSON_LAYOUT",
    "Constrainer",
    "GrammarError",
    "GrammarProcessor",
    "constraint_processor",
    "grammar_from",
    "lark_for_json_schema",
    "unpack_bitmask",
]
