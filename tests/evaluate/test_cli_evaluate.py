"""The `llamaforge perplexity` and `llamaforge eval` verbs, in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamaforge.cli import main

DATA = Path(__file__).parent / "data"


def test_eval_prints_table_and_writes_json(tiny_hf_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "results.json"
    rc = main(["eval", "--model", str(tiny_hf_dir), "--tasks", "piqa,boolq,mmlu", "--data-dir", str(DATA), "-q",
               "--batch-size", "4", "--output", str(out), "--log-samples", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    table = capsys.readouterr().out
    assert "| PIQA | 0 | 6 | acc (per char) |" in table and "| MMLU | 5 | 3 | acc |" in table
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"piqa", "boolq", "mmlu"}
    boolq = data["results"]["boolq"]
    assert boolq["paper_metric"] == "acc_uncond" and len(boolq["items"]) == 3 and "unconditional" in boolq["items"][0]
    assert 0 <= boolq["acc"] <= 1 and boolq["acc_stderr"] is not None


def test_eval_errors(tiny_hf_dir: Path, capsys) -> None:
    assert main(["eval", "--model", str(tiny_hf_dir), "--tasks", "nope", "-q"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_hf_dir), "--tasks", "arc_challenge", "--data-dir", str(DATA), "-q",
                 "--device", "cpu"]) == 2  # fmt: skip
    assert "no test data for task arc_challenge" in capsys.readouterr().err


def test_perplexity_files_and_reference(tiny_hf_dir: Path, tmp_path: Path, capsys) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text((DATA / "ppl_text.txt").read_text())
    b.write_text("A second, much shorter text about the sea and the light.")
    out = tmp_path / "ppl.json"
    rc = main(["perplexity", "--model", str(tiny_hf_dir), str(a), str(b), "--context", "64", "--stride", "32",
               "--reference-model", str(tiny_hf_dir), "--json", str(out), "-q", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "context 64, stride 32" in text and "| total |" in text
    data = json.loads(out.read_text())
    first, second, total = data["results"]
    assert total["tokens"] == first["tokens"] + second["tokens"]
    assert first["mean_kl"] == pytest.approx(0.0, abs=1e-6) and first["top1_agreement"] == 1.0  # same model
    assert first["bytes"] == len(a.read_bytes()) and first["bits_per_byte"] > 0

    assert main(["perplexity", "--model", str(tiny_hf_dir), str(tmp_path / "missing.txt"), "-q"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["perplexity", "--model", str(tiny_hf_dir), str(a), "--context", "8", "--stride", "9", "-q",
                 "--device", "cpu"]) == 2  # fmt: skip
    assert "--stride 9 is longer than the context" in capsys.readouterr().err
