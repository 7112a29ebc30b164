"""Tokenizer file formats: SentencePiece model protos, Meta's tiktoken files, GGUF vocabularies.

- A SentencePiece ``tokenizer.model`` is a protobuf ``ModelProto``; the few fields llamaforge needs
  (pieces with score and type, the normalizer's dummy-prefix flag) are read and written with a minimal
  wire-format codec here, so that neither ``protobuf`` nor generated code is needed.
- A GGUF ``llama`` vocabulary (tokens, scores, token types) is exactly a SentencePiece BPE model's piece
  table, so it is rebuilt as one and tokenized by ``sentencepiece`` itself.
- A GGUF ``gpt2`` vocabulary (byte-level tokens and merges) becomes a ``tokenizers`` BPE whose
  pre-tokenizer applies, in order, the regexes llama.cpp uses for the file's ``tokenizer.ggml.pre``.
- Meta's tiktoken files are ``base64(token) rank`` lines; the special tokens and the pre-tokenizer
  pattern of each Llama generation are defined here as Meta's reference code defines them.
"""

from __future__ import annotations

import base64
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# SentencePiece piece types; GGUF's tokenizer.ggml.token_type uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# --- protobuf wire format ---------------------------------------------------------------------------
def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data):
            raise ValueError("truncated varint")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(data, i)
            value, i = data[i : i + n], i + n
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > len(data):
            raise ValueError("truncated field")
        yield number, wire, value


def _enc_varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values are 10-byte two's complement varints
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _enc(number: int, value: int | float | bytes | str) -> bytes:
    if isinstance(value, (bytes, str)):
        payload = value.encode() if isinstance(value, str) else value
        return _enc_varint(number << 3 | 2) + _enc_varint(len(payload)) + payload
    if isinstance(value, float):
        return _enc_varint(number << 3 | 5) + struct.pack("<f", value)
    return _enc_varint(number << 3) + _enc_varint(int(value))


# --- SentencePiece ----------------------------------------------------------------------------------
def read_sp_proto(data: bytes) -> tuple[list[str], list[float], list[int], bool]:
    """Pieces, scores, types and the add-dummy-prefix flag of a serialized SentencePiece ModelProto."""
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    add_dummy_prefix = True
    for number, wire, value in _fields(data):
        if number == 1 and wire == 2:
            piece, score, kind = "", 0.0, NORMAL
            for n, _, v in _fields(value):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 2:
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = v
            pieces.append(piece)
            scores.append(score)
            types.append(kind)
        elif number == 3 and wire == 2:
            for n, _, v in _fields(value):
                if n == 3:
                    add_dummy_prefix = bool(v)
    if not pieces:
        raise ValueError("not a SentencePiece model (no pieces)")
    return pieces, scores, types, add_dummy_prefix


def sp_proto_without_dummy_prefix(data: bytes) -> bytes:
    """The same model with ``add_dummy_prefix`` off (protobuf keeps the last value of a repeated scalar)."""
    out = bytearray()
    found = False
    for number, wire, value in _fields(data):
        if number == 3 and wire == 2:
            value, found = value + _enc(3, 0), True
        out += _enc_varint(number << 3 | wire)
        out += _enc_varint(value) if wire == 0 else _enc_varint(len(value)) + value if wire == 2 else value
    if not found:
        out += _enc(3, _enc(3, 0))
    return bytes(out)


def sp_proto_from_gguf(meta: dict[str, Any], source: str) -> bytes:
    """A SentencePiece BPE ModelProto with the pieces, scores and types of a GGUF ``llama`` vocabulary."""
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if not len(tokens) == len(scores) == len(types):
        raise ValueError(
            f"{source}: tokenizer.ggml.tokens, scores and token_type have different lengths "
            f"({len(tokens)}, {len(scores)}, {len(types)})"
        )
    seen: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in seen or not token:
            raise ValueError(
                f"{source}: tokenizer.ggml.tokens[{i}] = {token!r} is empty or repeats tokens[{seen.get(token)}]; "
                "a llama (SentencePiece) vocabulary needs unique, non-empty pieces"
            )
        seen[token] = i
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    if UNKNOWN not in types:
        if unk is None:
            raise ValueError(f"{source}: a llama vocabulary needs an unknown token (token_type 2 or unknown_token_id)")
        types[unk] = UNKNOWN
    unk = types.index(UNKNOWN)
    out = bytearray()
    for token, score, kind in zip(tokens, scores, types):
        out += _enc(1, _enc(1, token) + _enc(2, float(score)) + _enc(3, int(kind)))

    def control_id(key: str) -> int:  # sentencepiece wants bos/eos to be control pieces; -1 when not
        value = meta.get(key)
        return value if value is not None and 0 <= value < len(types) and types[value] == CONTROL else -1

    bos, eos = control_id("tokenizer.ggml.bos_token_id"), control_id("tokenizer.ggml.eos_token_id")
    # model_type BPE, vocab_size, byte_fallback, unk/bos/eos/pad ids
    trainer = _enc(3, 2) + _enc(4, len(tokens)) + _enc(35, int(BYTE in types)) + _enc(40, unk)
    trainer += _enc(41, bos) + _enc(42, eos) + _enc(43, -1)
    # name, add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces
    normalizer = (
        _enc(1, "identity")
        + _enc(3, int(meta.get("tokenizer.ggml.add_space_prefix", True)))
        + _enc(4, int(meta.get("tokenizer.ggml.remove_extra_whitespaces", False)))
        + _enc(5, 1)
    )
    return bytes(out + _enc(2, trainer) + _enc(3, normalizer))


# --- tiktoken (Meta's Llama 3 and Llama 4 tokenizer.model) ----------------------------------------
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
LLAMA4_PATTERN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def llama3_special_tokens() -> list[str]:
    """The 256 special tokens after Llama 3's 128,000 base tokens, in id order."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
        "<|image|>",
    ]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(named))]


def llama4_special_tokens() -> list[str]:
    """The 2,048 special tokens after Llama 4's 200,000 base tokens, in id order."""

    def reserved(kind: str, count: int, start: int = 0) -> list[str]:
        return [f"<|{kind}_reserved_special_token_{i}|>" for i in range(start, start + count)]

    text = ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>", *reserved("text_post_train", 6)]
    text += ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>", *reserved("text_post_train", 61, 8)]
    vision = [
        "<|image_start|>",
        "<|image_end|>",
        *reserved("vision", 2),
        "<|tile_x_separator|>",
        "<|tile_y_separator|>",
        *reserved("vision", 4, 2),
        "<|image|>",
        *reserved("vision", 1, 6),
        "<|patch|>",
        *reserved("vision", 1041, 7),
    ]
    reasoning = [*reserved("reasoning", 8), "<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        *text,
        *vision,
        *reasoning,
    ]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(2048 - len(named))]


TIKTOKEN_GENERATIONS: dict[int, dict[str, Any]] = {
    128_000: {
        "name": "llama3",
        "pattern": LLAMA3_PATTERN,
        "special": llama3_special_tokens,
        "eot": "<|eot_id|>",
        "eom": "<|eom_id|>",
    },
    200_000: {
        "name": "llama4",
        "pattern": LLAMA4_PATTERN,
        "special": llama4_special_tokens,
        "eot": "<|eot|>",
        "eom": "<|eom|>",
    },
}
TIKTOKEN_GGUF_PRE = {"llama3": "llama-bpe", "llama4": "llama4"}

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n")


def is_tiktoken_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return bool(_TIKTOKEN_LINE.match(f.read(512)))


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not a tiktoken 'base64 rank' line: {line[:60]!r}") from exc
    return ranks


# --- byte-level BPE ---------------------------------------------------------------------------------
def _byte_to_char() -> dict[int, str]:
    # GPT-2's reversible map: printable bytes stand for themselves, the others for chr(256 + n).
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return table


BYTE_TO_CHAR = _byte_to_char()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def bytes_to_bytelevel(data: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in data)


def bytelevel_to_bytes(piece: str) -> bytes | None:
    try:
        return bytes(CHAR_TO_BYTE[c] for c in piece)
    except KeyError:
        return None


def merges_from_ranks(ranks: dict[bytes, int]) -> list[str]:
    """BPE merges equivalent to tiktoken ranks: each token's last merge when tiktoken builds it."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = min(
                ((r, i) for i in range(len(parts) - 1) if (r := ranks.get(parts[i] + parts[i + 1], rank)) < rank),
                default=None,
            )
            if best is None:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append(f"{bytes_to_bytelevel(parts[0])} {bytes_to_bytelevel(parts[1])}")
    return merges


# --- GGUF -------------------------------------------------------------------------------------------
# tokenizer.ggml.pre -> (regexes applied in order, ignore_merges, add_bos default), as llama.cpp defines them.
_LLAMA3 = ((LLAMA3_PATTERN,), True, True)
_DIGITS_GPT2 = ((r"\p{N}", GPT2_PATTERN), False, False)
GGUF_PRE: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "default": ((GPT2_PATTERN,), False, False),
    "gpt-2": ((GPT2_PATTERN,), False, False),
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "falcon3": _LLAMA3,
    "pixtral": _LLAMA3,
    "smollm": _DIGITS_GPT2,
    "starcoder": _DIGITS_GPT2,
    "refact": _DIGITS_GPT2,
    "codeshell": _DIGITS_GPT2,
    "llama4": ((LLAMA4_PATTERN,), False, False),
    "gpt-4o": ((LLAMA4_PATTERN,), False, False),
    "qwen2": ((QWEN2_PATTERN,), False, False),
    "deepseek-r1-qwen": ((QWEN2_PATTERN,), False, False),
}


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read_gguf_tokenizer_metadata(path: Path) -> dict[str, Any]:
    """The ``tokenizer.*`` keys of a GGUF file (model or vocab-only)."""
    from ..checkpoint.gguf import read_metadata

    return {k: v for k, v in read_metadata(path).items() if k.startswith("tokenizer.")}


def hf_from_gguf_bpe(meta: dict[str, Any], source: str) -> tuple[Any, bool]:
    """A ``tokenizers.Tokenizer`` for a GGUF ``gpt2`` vocabulary, and llama.cpp's add-BOS default for it."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre not in GGUF_PRE:
        raise ValueError(
            f"{source}: tokenizer.ggml.pre = {pre!r} is not supported; llamaforge knows " + ", ".join(sorted(GGUF_PRE))
        )
    patterns, ignore_merges, add_bos = GGUF_PRE[pre]
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    merges = []
    for n, merge in enumerate(meta.get("tokenizer.ggml.merges") or []):
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"{source}: tokenizer.ggml.merges[{n}] = {merge!r} is not 'left right'")
        merges.append((left, right))
    tk = HFTok(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False))
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
    bytelevel = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.pre_tokenizer = pre_tokenizers.Sequence([*splits, bytelevel])
    tk.decoder = decoders.ByteLevel()
    # Control tokens are special (parsed only on request); user-defined ones always match, as in llama.cpp.
    kinds = list(zip(tokens, types))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in kinds if k == CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in kinds if k == USER_DEFINED])
    return tk, add_bos


def _pre_name(pre_tokenizer: dict[str, Any] | None, source: str) -> str:
    """The llama.cpp ``tokenizer.ggml.pre`` name of a tokenizer.json byte-level pre-tokenizer."""
    steps = (pre_tokenizer or {}).get("pretokenizers") or [pre_tokenizer or {}]
    regexes = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    digits = any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps)
    bytelevel_regex = any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps)
    by_pattern = {LLAMA3_PATTERN: "llama-bpe", LLAMA4_PATTERN: "llama4", QWEN2_PATTERN: "qwen2"}
    if len(regexes) == 1 and regexes[0] in by_pattern and not digits:
        return by_pattern[regexes[0]]
    if not regexes and bytelevel_regex:
        return "smollm" if digits else "gpt-2"
    raise ValueError(f"{source}: no GGUF pre-tokenizer name matches this tokenizer.json pre_tokenizer")


def gguf_from_tokenizer_json(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``tokenizer.ggml.*`` keys for a byte-level BPE tokenizer.json (SmolLM2, Llama 3 and 4 on the hub)."""
    model = data.get("model") or {}
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise NotImplementedError(
            f"{source}: GGUF export supports byte-level BPE tokenizer.json files; "
            "for SentencePiece models keep the tokenizer.model file"
        )
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    size = max([*model["vocab"].values(), *added]) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]  # llama.cpp's filler for ids the file leaves out
    types = [UNUSED] * size
    for token, i in model["vocab"].items():
        tokens[i], types[i] = token, NORMAL
    for i, t in added.items():
        tokens[i], types[i] = t["content"], CONTROL if t.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = _pre_name(data.get("pre_tokenizer"), source)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
