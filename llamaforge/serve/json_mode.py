"""JSON mode: a logits processor that only allows tokens keeping the output a valid prefix of a JSON object.

A character-level pushdown automaton (``step``) follows the JSON grammar (RFC 8259). For every automaton
state the set of tokens that may come next is computed once by feeding each token's text through the
automaton, and cached: inside a string almost every token is "plain" (no quote, backslash or control
character) and leaves the state unchanged, so those are taken from a precomputed mask and only the few
others are simulated; elsewhere tokens are grouped by their first character and whole groups are ruled
out at once.

The output is also guaranteed to close: for each candidate token we know the length of the shortest text
that completes the JSON value after it (``closing``), and a token is allowed only while that completion
still fits in the tokens the request has left (every character the completion needs - ``}``, ``]``,
``"``, ``:``, ``0``, letters of true/false/null - is a single token in LLaMA-family vocabularies). Once the
object is closed only the end-of-sequence tokens remain, so generation stops there.

Tokens whose text is U+FFFD (pieces of a multi-byte UTF-8 character) count as non-ASCII characters,
allowed only inside strings; bytes >= 0x80 never form JSON punctuation, so the decoded output keeps its
structure even if such a string ends inside a character.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

# Automaton modes.
(START, VALUE, ARR_FIRST, OBJ_FIRST, KEY, COLON, AFTER, DONE, STR, ESC, UHEX,
 NUM_MINUS, NUM_ZERO, NUM_INT, NUM_DOT, NUM_FRAC, NUM_E, NUM_ESIGN, NUM_EXP, LIT) = range(20)  # fmt: skip

State = tuple[str, int, Any]  # (stack of open containers "o"/"a", mode, mode data)
WS = frozenset(" \t\n\r")
_NUM_DONE = frozenset({NUM_ZERO, NUM_INT, NUM_FRAC, NUM_EXP})  # a number may end here
_NUM_OPEN = frozenset({NUM_MINUS, NUM_DOT, NUM_E, NUM_ESIGN})  # a digit must follow
_ESCAPES = frozenset('"\\/bfnrtu')
_HEX = frozenset("0123456789abcdefABCDEF")
_INVALID = 32767  # "this token is not allowed" in the int16 tables
START_STATE: State = ("", START, None)


def _after_value(stack: str) -> State:
    return (stack, AFTER, None) if stack else ("", DONE, None)


def _value_start(stack: str, ch: str) -> State | None:
    if ch == "{":
        return (stack + "o", OBJ_FIRST, None)
    if ch == "[":
        return (stack + "a", ARR_FIRST, None)
    if ch == '"':
        return (stack, STR, False)
    if ch == "-":
        return (stack, NUM_MINUS, None)
    if ch == "0":
        return (stack, NUM_ZERO, None)
    if "1" <= ch <= "9":
        return (stack, NUM_INT, None)
    literal = {"t": "rue", "f": "alse", "n": "ull"}.get(ch)
    return (stack, LIT, literal) if literal else None


def step(state: State, ch: str) -> State | None:
    """The state after one more character, or None when `ch` cannot come next."""
    stack, mode, aux = state
    if mode == STR:
        if ch == '"':
            return (stack, COLON, None) if aux else _after_value(stack)
        if ch == "\\":
            return (stack, ESC, aux)
        return None if ch < " " else state
    if mode == ESC:
        if ch not in _ESCAPES:
            return None
        return (stack, UHEX, (aux, 4)) if ch == "u" else (stack, STR, aux)
    if mode == UHEX:
        if ch not in _HEX:
            return None
        is_key, left = aux
        return (stack, STR, is_key) if left == 1 else (stack, UHEX, (is_key, left - 1))
    if mode in _NUM_DONE or mode in _NUM_OPEN:
        nxt = _number_step(mode, ch)
        if nxt is not None:
            return (stack, nxt, None)
        return step(_after_value(stack), ch) if mode in _NUM_DONE else None
    if mode == LIT:
        if ch != aux[0]:
            return None
        return (stack, LIT, aux[1:]) if len(aux) > 1 else _after_value(stack)
    if ch in WS:  # not before the object (it would only waste tokens) nor after it
        return None if mode in (START, DONE) else state
    if mode == START:
        return (stack + "o", OBJ_FIRST, None) if ch == "{" else None
    if mode == VALUE:
        return _value_start(stack, ch)
    if mode == ARR_FIRST:
        return _after_value(stack[:-1]) if ch == "]" else _value_start(stack, ch)
    if mode == OBJ_FIRST:
        if ch == "}":
            return _after_value(stack[:-1])
        return (stack, STR, True) if ch == '"' else None
    if mode == KEY:
        return (stack, STR, True) if ch == '"' else None
    if mode == COLON:
        return (stack, VALUE, None) if ch == ":" else None
    if mode == AFTER:
        top = stack[-1]
        if ch == ",":
            return (stack, KEY if top == "o" else VALUE, None)
        if (ch == "}" and top == "o") or (ch == "]" and top == "a"):
            return _after_value(stack[:-1])
    return None


def _number_step(mode: int, ch: str) -> int | None:
    digit = "0" <= ch <= "9"
    if mode == NUM_MINUS:
        return NUM_ZERO if ch == "0" else NUM_INT if digit else None
    if mode in (NUM_ZERO, NUM_INT, NUM_FRAC) and ch in "eE":
        return NUM_E
    if mode in (NUM_ZERO, NUM_INT) and ch == ".":
        return NUM_DOT
    if mode == NUM_INT and digit:
        return NUM_INT
    if mode in (NUM_DOT, NUM_FRAC) and digit:
        return NUM_FRAC
    if mode == NUM_E and ch in "+-":
        return NUM_ESIGN
    if mode in (NUM_E, NUM_ESIGN, NUM_EXP) and digit:
        return NUM_EXP
    return None


def advance(state: State | None, text: str) -> State | None:
    for ch in text:
        if state is None:
            return None
        state = step(state, ch)
    return state


def closing(state: State) -> str:
    """The shortest text that completes the JSON value from `state`."""
    stack, mode, aux = state
    if mode == START:
        local = "{}"
    elif mode == VALUE:
        local = "0"
    elif mode == KEY:
        local = '"":0'
    elif mode == COLON:
        local = ":0"
    elif mode in (STR, ESC, UHEX):
        is_key = aux[0] if mode == UHEX else aux
        pending = "0" * aux[1] if mode == UHEX else "n" if mode == ESC else ""
        local = pending + '"' + (":0" if is_key else "")
    elif mode in _NUM_OPEN:
        local = "0"
    elif mode == LIT:
        local = aux
    else:  # ARR_FIRST, OBJ_FIRST, AFTER, DONE, finished numbers
        local = ""
    return local + "".join("}" if c == "o" else "]" for c in reversed(stack))


def is_complete(state: State) -> bool:
    return state[1] == DONE


# Vocabulary tables ----------------------------------------------------------------------------------------
class JsonVocab:
    """What JSON mode needs to know about a tokenizer's vocabulary, shared by all requests.

    ``allowed_lengths(state)`` is an int16 tensor [V]: for each token, the length of ``closing`` after it,
    or _INVALID. Results are cached per state (LRU); this object is used from the engine thread only.
    """

    def __init__(self, texts: Sequence[str], stop_ids: Iterable[int], vocab_size: int, cache_size: int = 512) -> None:
        self.texts = list(texts) + [""] * (vocab_size - len(texts))
        self.vocab_size = vocab_size
        self.stop_ids = sorted(i for i in set(stop_ids) if 0 <= i < vocab_size)
        self.by_first: dict[str, list[int]] = {}
        string_special: list[int] = []
        plain = torch.zeros(vocab_size, dtype=torch.bool)
        for i, text in enumerate(self.texts):
            if not text or i in self.stop_ids:
                continue
            self.by_first.setdefault(text[0], []).append(i)
            if any(c == '"' or c == "\\" or c < " " for c in text):
                string_special.append(i)
            else:
                plain[i] = True
        self.plain_in_string = plain
        self.string_special = string_special
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[State, str], Tensor] = OrderedDict()

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int) -> JsonVocab:
        """Each token's text as it reads after other text (so SentencePiece's leading spaces are kept)."""
        stop_ids = getattr(tokenizer, "stop_ids", None) or (
            [tokenizer.eos_id] if getattr(tokenizer, "eos_id", None) is not None else []
        )
        special = set(getattr(tokenizer, "special_tokens", {}).values())
        n = min(vocab_size, getattr(tokenizer, "vocab_size", vocab_size))
        anchor = tokenizer.encode("a")
        anchor = anchor[-1:] if anchor else []
        base = tokenizer.decode(anchor, skip_special=True)
        texts = []
        for i in range(n):
            if i in special:
                texts.append("")
                continue
            text = tokenizer.decode([*anchor, i], skip_special=True)
            texts.append(text[len(base) :] if text.startswith(base) else tokenizer.decode([i], skip_special=True))
        return cls(texts, stop_ids, vocab_size)

    def closing_lengths(self, state: State, device: torch.device) -> Tensor:
        key = (state, str(device))
        table = self._cache.get(key)
        if table is not None:
            self._cache.move_to_end(key)
            return table
        table = self._scan(state).to(device)
        self._cache[key] = table
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return table

    def _scan(self, state: State) -> Tensor:
        out = torch.full((self.vocab_size,), _INVALID, dtype=torch.int16)
        if state[1] == DONE:
            return out
        if state[1] == STR:
            out[self.plain_in_string] = min(len(closing(state)), _INVALID - 1)
            candidates: Iterable[tuple[State, int, int]] = ((state, i, 0) for i in self.string_special)
        else:
            candidates = (
                (first, i, 1)
                for ch, ids in self.by_first.items()
                if (first := step(state, ch)) is not None
                for i in ids
            )
        for start, i, skip in candidates:
            end = advance(start, self.texts[i][skip:])
            if end is not None:
                out[i] = min(len(closing(end)), _INVALID - 1)
        return out


class JsonObjectProcessor:
    """Per-request logits processor for ``response_format={"type": "json_object"}``.

    Called by the engine as ``processor(output_ids, logits[V])`` before each token is sampled.
    """

    def __init__(self, vocab: JsonVocab, max_new_tokens: int) -> None:
        self.vocab = vocab
        self.max_new_tokens = max_new_tokens
        self.state: State | None = START_STATE
        self.seen = 0
        self._lock = threading.Lock()

    def __call__(self, output_ids: list[int], logits: Tensor) -> Tensor:
        with self._lock:
            for token in output_ids[self.seen :]:
                if self.state is not None and token not in self.vocab.stop_ids:
                    self.state = advance(self.state, self.vocab.texts[token])
            self.seen = len(output_ids)
            if self.state is None:  # cannot happen with our own masks; leave the logits alone
                return logits
            left = self.max_new_tokens - len(output_ids)  # tokens still to come, this one included
            lengths = self.vocab.closing_lengths(self.state, logits.device)
            allowed = lengths <= left - 1
            if is_complete(self.state):
                allowed = torch.zeros_like(allowed)
                allowed[self.vocab.stop_ids] = True
            if not bool(allowed.any()):
                return logits
            return logits.masked_fill(~allowed, float("-inf"))
