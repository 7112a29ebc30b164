"""Fuzzing the GGUF reader: any file loads (model and vocabulary) or is refused with a CheckpointError /
TokenizerError naming the file; never another exception, a hang or unbounded memory."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from fuzzing import SLOW_EXAMPLES, refuses_cleanly
from gguf_files import gguf_files
from hypothesis import given, settings

from llamaforge.checkpoint import gguf as G
from llamaforge.checkpoint import load_model
from llamaforge.errors import CheckpointError, TokenizerError
from llamaforge.tokenizer import load_tokenizer


def check_gguf(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.gguf"
        path.write_bytes(data)
        refuses_cleanly(path, G.read_raw, (CheckpointError,))
        model = refuses_cleanly(path, load_model, (CheckpointError,))
        if model is not None:
            assert model[0].config.dim > 0
        # A file without a vocabulary is a FileNotFoundError for the tokenizer (there is none to load).
        tokenizer = refuses_cleanly(path, load_tokenizer, (CheckpointError, TokenizerError, FileNotFoundError))
        if tokenizer is not None:  # a vocabulary that loads also works
            ids = tokenizer.encode("the hat, héllo ✓")
            assert all(0 <= i < tokenizer.vocab_size for i in ids)
            assert isinstance(tokenizer.decode(ids), str)


@settings(max_examples=5)
@given(gguf_files(damage=False))
def test_valid_files_load(tmp_path: Path, data: bytes) -> None:
    """The generator's undamaged files are real models with a vocabulary (the fuzzer starts from loadable files)."""
    path = tmp_path / "ok.gguf"
    path.write_bytes(data)
    model, fmt = load_model(path)
    assert fmt == "gguf" and model.config.n_layers == 1
    assert load_tokenizer(path).encode("the")


@given(gguf_files())
def test_fuzz_gguf(bounded_memory, data: bytes) -> None:
    check_gguf(data)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES)
@given(gguf_files())
def test_fuzz_gguf_long(bounded_memory, data: bytes) -> None:
    check_gguf(data)
