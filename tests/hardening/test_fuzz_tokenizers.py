"""Fuzzing the tokenizer readers (tokenizer.json with tokenizer_config.json, SentencePiece tokenizer.model,
tiktoken tokenizer.model; GGUF vocabularies are fuzzed with the GGUF files): a damaged file loads or is refused
with a TokenizerError naming the file, and a tokenizer that loads can encode and decode."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from fuzzing import SLOW_EXAMPLES, refuses_cleanly
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaforge.errors import CheckpointError, TokenizerError
from llamaforge.tokenizer import formats as fmt
from llamaforge.tokenizer import load_tokenizer

CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _tokenizer_json() -> dict[str, Any]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 8, trainer)
    return json.loads(tk.to_str())


TOKENIZER_JSON = _tokenizer_json()
TOKENIZER_CONFIG = {"bos_token": None, "eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": CHATML}
SP_META = {
    "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "▁t", "he", "a"],
    "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * 4,
    "tokenizer.ggml.scores": [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0],
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2,
}
SP_PROTO = fmt.sp_proto_from_gguf(SP_META, "fuzz")


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON document (the vocabulary's entries sampled, not all 300)."""
    out = [prefix]
    if isinstance(value, dict):
        items = list(value.items())[:12]
        for key, v in items:
            out += _paths(v, (*prefix, key))
    elif isinstance(value, list):
        for i, v in enumerate(value[:6]):
            out += _paths(v, (*prefix, i))
    return out


JSON_PATHS = _paths(TOKENIZER_JSON)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def tokenizer_json_dirs(draw: Any) -> dict[str, bytes]:
    doc = copy.deepcopy(TOKENIZER_JSON)
    for path in draw(st.lists(st.sampled_from(JSON_PATHS[1:]), max_size=3)):
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.booleans()) and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier change removed this path
    raw = json.dumps(doc).encode()
    if draw(st.integers(0, 9)) == 9:
        raw = raw[: draw(st.integers(0, len(raw)))]
    config = dict(TOKENIZER_CONFIG)
    for key in list(config):
        if draw(st.integers(0, 9)) == 9:
            config[key] = draw(json_values)
    return {"tokenizer.json": raw, "tokenizer_config.json": json.dumps(config).encode()}


@st.composite
def sentencepiece_dirs(draw: Any) -> dict[str, bytes]:
    out = bytearray(SP_PROTO)
    for _ in range(draw(st.integers(0, 6))):
        out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    if draw(st.integers(0, 4)) == 4:
        del out[draw(st.integers(0, len(out))) :]
    if draw(st.integers(0, 4)) == 4:
        out += draw(st.binary(max_size=40))
    return {"tokenizer.model": bytes(out)}


@st.composite
def tiktoken_dirs(draw: Any) -> dict[str, bytes]:
    lines = draw(st.lists(st.tuples(st.binary(min_size=1, max_size=6), st.integers(-5, 2**70)), max_size=20))
    import base64

    text = b"".join(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n" for tok, rank in lines)
    if draw(st.booleans()):
        text += draw(st.binary(max_size=30))
    return {"tokenizer.model": text}


def check_tokenizer(files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tok"
        path.mkdir()
        for name, data in files.items():
            (path / name).write_bytes(data)
        # Bytes that start like a GGUF file are read as one: a CheckpointError then.
        tokenizer = refuses_cleanly(path, load_tokenizer, (TokenizerError, CheckpointError))
        if tokenizer is not None:
            ids = tokenizer.encode("the quick héllo ✓ <|im_end|>")
            assert all(isinstance(i, int) for i in ids)
            assert isinstance(tokenizer.decode(ids), str)


def test_valid_tokenizers_load(tmp_path: Path) -> None:
    for name, files in (("json", {"tokenizer.json": json.dumps(TOKENIZER_JSON).encode(),
                                  "tokenizer_config.json": json.dumps(TOKENIZER_CONFIG).encode()}),
                        ("sp", {"tokenizer.model": SP_PROTO})):  # fmt: skip
        (tmp_path / name).mkdir()
        for file, data in files.items():
            (tmp_path / name / file).write_bytes(data)
        assert load_tokenizer(tmp_path / name).encode("the quick")


@pytest.mark.parametrize("strategy", [tokenizer_json_dirs(), sentencepiece_dirs(), tiktoken_dirs()],
                         ids=["tokenizer.json", "sentencepiece", "tiktoken"])  # fmt: skip
def test_fuzz_tokenizer_files(bounded_memory, strategy: Any) -> None:
    given(strategy)(check_tokenizer)()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [tokenizer_json_dirs(), sentencepiece_dirs(), tiktoken_dirs()],
                         ids=["tokenizer.json", "sentencepiece", "tiktoken"])  # fmt: skip
def test_fuzz_tokenizer_files_long(bounded_memory, strategy: Any) -> None:
    settings(max_examples=SLOW_EXAMPLES)(given(strategy)(check_tokenizer))()
