"""``llamaforge tokenize``: ids and pieces of a text or a chat prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamaforge.cli import main
from llamaforge.tokenizer import load_tokenizer


def test_tokenize_text(smollm2_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenize", "--model", str(smollm2_gguf), "Hi <|im_end|> 12"]) == 0
    out = capsys.readouterr().out
    ids = load_tokenizer(smollm2_gguf).encode("Hi <|im_end|> 12")
    assert f"ids: {json.dumps(ids)}" in out and f"{len(ids)} tokens" in out
    assert "'Ġ<'" in out and "(special)" not in out  # typed special-token text is ordinary text


def test_tokenize_special_and_json(smollm2_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenize", "-m", str(smollm2_gguf), "--special", "--json", "Hi<|im_end|>"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ids"][-1] == 2 and data["tokens"][-1]["piece"] == "<|im_end|>"


def test_tokenize_chat(smollm2_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    assert main(["tokenize", "-m", str(smollm2_gguf), "--chat", json.dumps(messages)]) == 0
    out = capsys.readouterr().out
    tok = load_tokenizer(smollm2_gguf)
    assert repr(tok.format_chat(messages)) in out and f"ids: {json.dumps(tok.encode_chat(messages))}" in out
    chat_file = tmp_path / "chat.json"
    chat_file.write_text(json.dumps(messages))
    assert main(["tokenize", "-m", str(smollm2_gguf), "--chat", str(chat_file), "--template", "llama3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["prompt"].startswith("<|begin_of_text|><|start_header_id|>user")


def test_tokenize_errors(smollm2_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenize", "-m", str(tmp_path), "x"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert main(["tokenize", "-m", str(smollm2_gguf), "--chat", "{not json"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["tokenize", "-m", str(smollm2_gguf), "--chat", "[]", "x"]) == 2
