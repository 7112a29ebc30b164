"""GGUF files from Hypothesis: a tiny llama model with a vocabulary, whose every field may be damaged.

The file is serialized here, by hand, so that it can lie where a writer never would: counts, string lengths,
value and array item types, tensor dimensions, type ids, offsets, alignment. Each field keeps its valid value
most of the time, so that damaged files reach every stage of the loader, not only the first check.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import strategies as st

STRING, ARRAY = 8, 9
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                  12: "<d"}  # fmt: skip
U32, F32 = 4, 6
DIM, HEADS, KV_HEADS, FFN, CTX = 32, 2, 1, 32, 64
BYTE_CHARS = [chr(c) for c in range(ord("!"), ord("~") + 1)] + [chr(c) for c in range(0xA1, 0xAD)]
BYTE_CHARS += [chr(c) for c in range(0xAE, 0x100)] + [chr(0x100 + n) for n in range(68)]  # GPT-2's byte alphabet

# ggml type ids of llama.cpp and sizes: (block, bytes per block) for the few the builder uses for valid tensors.
VALID_TYPES = {0: (1, 4), 1: (1, 2), 30: (1, 2), 8: (32, 34), 2: (32, 18), 12: (256, 144)}


def _tensor_shapes(vocab: int) -> dict[str, tuple[int, ...]]:
    """GGUF name -> dims as GGUF lists them (fastest first)."""
    head = DIM // HEADS
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (DIM, vocab), "output_norm.weight": (DIM,)}
    kv = KV_HEADS * head
    layer = {"attn_q.weight": (DIM, DIM), "attn_k.weight": (DIM, kv), "attn_v.weight": (DIM, kv),
             "attn_output.weight": (DIM, DIM), "attn_norm.weight": (DIM,), "ffn_norm.weight": (DIM,),
             "ffn_gate.weight": (DIM, FFN), "ffn_up.weight": (DIM, FFN), "ffn_down.weight": (FFN, DIM)}  # fmt: skip
    shapes.update({f"blk.0.{name}": dims for name, dims in layer.items()})
    return shapes


def _vocabulary(kind: str) -> dict[str, tuple[int, Any]]:
    """tokenizer.ggml.* entries as {key: (value type, value)}; arrays as (ARRAY, (item type, items))."""
    if kind == "gpt2":
        tokens = [*BYTE_CHARS, "Ġt", "he", "Ġthe", "<|endoftext|>"]
        types = [1] * (len(tokens) - 1) + [3]
        return {
            "tokenizer.ggml.model": (STRING, "gpt2"),
            "tokenizer.ggml.pre": (STRING, "default"),
            "tokenizer.ggml.tokens": (ARRAY, (STRING, tokens)),
            "tokenizer.ggml.token_type": (ARRAY, (5, types)),
            "tokenizer.ggml.merges": (ARRAY, (STRING, ["Ġ t", "h e", "Ġt he"])),
            "tokenizer.ggml.bos_token_id": (U32, len(tokens) - 1),
            "tokenizer.ggml.eos_token_id": (U32, len(tokens) - 1),
        }
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "▁t", "he", "▁the", "a"]
    types = [2, 3, 3] + [6] * 256 + [1] * 5
    scores = [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0]
    return {
        "tokenizer.ggml.model": (STRING, "llama"),
        "tokenizer.ggml.tokens": (ARRAY, (STRING, tokens)),
        "tokenizer.ggml.scores": (ARRAY, (F32, scores)),
        "tokenizer.ggml.token_type": (ARRAY, (5, types)),
        "tokenizer.ggml.bos_token_id": (U32, 1),
        "tokenizer.ggml.eos_token_id": (U32, 2),
        "tokenizer.ggml.unknown_token_id": (U32, 0),
    }


def _metadata(vocab_kind: str) -> dict[str, tuple[int, Any]]:
    md: dict[str, tuple[int, Any]] = {
        "general.architecture": (STRING, "llama"),
        "general.name": (STRING, "fuzz"),
        "llama.context_length": (U32, CTX),
        "llama.embedding_length": (U32, DIM),
        "llama.block_count": (U32, 1),
        "llama.feed_forward_length": (U32, FFN),
        "llama.attention.head_count": (U32, HEADS),
        "llama.attention.head_count_kv": (U32, KV_HEADS),
        "llama.attention.layer_norm_rms_epsilon": (F32, 1e-5),
        "llama.rope.freq_base": (F32, 10000.0),
    }
    md.update(_vocabulary(vocab_kind))
    return md


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n % 2**64)


def _random_value(draw: Any, vtype: int, depth: int = 0) -> Any:
    if vtype == STRING:
        return draw(st.text(max_size=20))
    if vtype == ARRAY and depth < 2:
        item = draw(st.sampled_from([*SCALAR_FORMATS, STRING, ARRAY]))
        return item, [_random_value(draw, item, depth + 1) for _ in range(draw(st.integers(0, 4)))]
    if vtype in (6, 12):
        return draw(st.floats(allow_nan=True, allow_infinity=True, width=32 if vtype == 6 else 64))
    if vtype == 7:
        return draw(st.booleans())
    fmt = SCALAR_FORMATS.get(vtype, "<I")
    bits = struct.calcsize(fmt) * 8
    if fmt[1].islower():
        return draw(st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    return draw(st.integers(0, 2**bits - 1))


@st.composite
def gguf_files(draw: Any, damage: bool = True) -> bytes:
    """The bytes of a tiny llama GGUF file, damaged anywhere (or, with damage=False, valid)."""
    rare = st.integers(0, 11).map(lambda x: x == 11) if damage else st.just(False)  # one field in twelve damaged

    def maybe(strategy: Any, valid: Any) -> Any:
        return draw(strategy) if draw(rare) else valid

    def string(text: str) -> bytes:
        raw = text.encode("utf-8", "surrogatepass")
        length = maybe(st.one_of(st.integers(0, len(raw) + 8), st.integers(0, 2**64 - 1)), len(raw))
        return _u64(length) + raw

    def value(vtype: int, v: Any, depth: int = 0) -> bytes:
        if vtype == STRING:
            return string(v)
        if vtype == ARRAY:
            if not isinstance(v, tuple):  # an array nested deeper than the generator builds
                return struct.pack("<IQ", 4, 0)
            item, items = v
            item_code = maybe(st.integers(0, 15), item)
            count = maybe(st.one_of(st.integers(0, len(items) + 4), st.integers(0, 2**64 - 1)), len(items))
            return struct.pack("<I", item_code) + _u64(count) + b"".join(value(item, x, depth + 1) for x in items)
        try:
            return struct.pack(SCALAR_FORMATS[vtype], v)
        except (struct.error, KeyError, OverflowError, TypeError):
            return struct.pack("<I", 0)

    vocab_kind = draw(st.sampled_from(["gpt2", "llama"]))
    md = _metadata(vocab_kind)
    if draw(rare):  # an alignment other than the default
        md["general.alignment"] = (U32, draw(st.sampled_from([0, 1, 3, 8, 64, 2**31, 2**32 - 1])))
    for key in list(md):
        if draw(rare):
            del md[key]
        elif draw(rare):  # the right key with a value of another type
            vtype = draw(st.sampled_from([*SCALAR_FORMATS, STRING, ARRAY]))
            md[key] = (vtype, _random_value(draw, vtype))
    if draw(rare):
        md[draw(st.text(max_size=12))] = (STRING, draw(st.text(max_size=8)))

    vocab_items = md.get("tokenizer.ggml.tokens", (ARRAY, (STRING, [])))[1]
    n_vocab = len(vocab_items[1]) if isinstance(vocab_items, tuple) and isinstance(vocab_items[1], list) else 8
    shapes = _tensor_shapes(max(n_vocab, 1))
    names = list(shapes)
    if draw(rare):
        names.append(draw(st.sampled_from(["output.weight", "rope_freqs.weight", "blk.1.attn_q.weight", "x"])))
        shapes.setdefault(names[-1], (DIM, DIM) if names[-1] != "rope_freqs.weight" else (DIM // HEADS // 2,))
    if draw(rare):
        names.remove(draw(st.sampled_from(names)))

    alignment = md.get("general.alignment", (U32, 32))[1]
    alignment = alignment if isinstance(alignment, int) and alignment > 0 and not alignment & (alignment - 1) else 32
    alignment = min(alignment, 4096)  # a file aligned to 2**31 would be gigabytes of padding: left unaligned
    table, data, offset = [], b"", 0
    for name in names:
        dims = shapes[name]
        type_id = draw(st.sampled_from(sorted(VALID_TYPES)))
        block, size = VALID_TYPES[type_id]
        if dims[0] % block:
            type_id, (block, size) = 0, VALID_TYPES[0]
        n = 1
        for d in dims:
            n *= d
        nbytes = n // block * size
        dims = maybe(st.lists(st.one_of(st.integers(0, 70), st.integers(0, 2**64 - 1)), max_size=6), list(dims))
        type_id = maybe(st.integers(0, 60), type_id)
        entry = string(name) + struct.pack("<I", maybe(st.integers(0, 8), len(dims)))
        entry += b"".join(_u64(d) for d in dims) + struct.pack("<I", type_id)
        entry += _u64(maybe(st.one_of(st.integers(0, offset + 64), st.integers(0, 2**64 - 1)), offset))
        table.append(entry)
        blob = draw(st.binary(min_size=min(nbytes, 64), max_size=64))
        blob = (blob * (nbytes // max(len(blob), 1) + 1))[:nbytes] if blob else bytes(nbytes)
        data += blob + bytes(-len(blob) % alignment)
        offset = len(data)

    kv = b"".join(string(key) + struct.pack("<I", vtype) + value(vtype, v) for key, (vtype, v) in md.items())
    magic = maybe(st.binary(min_size=4, max_size=4), b"GGUF")
    version = maybe(st.integers(0, 2**32 - 1), draw(st.sampled_from([2, 3])))
    n_tensors = maybe(st.one_of(st.integers(0, len(table) + 3), st.integers(0, 2**64 - 1)), len(table))
    n_kv = maybe(st.one_of(st.integers(0, len(md) + 3), st.integers(0, 2**64 - 1)), len(md))
    header = magic + struct.pack("<I", version) + _u64(n_tensors) + _u64(n_kv) + kv + b"".join(table)
    out = bytearray(header + bytes(-len(header) % alignment) + data)
    for _ in range(draw(st.integers(0, 3)) if draw(rare) else 0):  # a few random bytes anywhere in the header
        pos = draw(st.integers(0, len(header) - 1))
        out[pos] = draw(st.integers(0, 255))
    if draw(rare):
        del out[draw(st.integers(0, len(out))) :]
    return bytes(out)
