"""`llamaforge eval` on the generative tasks, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamaforge.cli import main
from llamaforge.evaluate import Sandbox, SandboxUnavailableError

DATA = Path(__file__).parent / "data"


def _sandbox_works() -> bool:
    try:
        Sandbox().run("pass")
    except SandboxUnavailableError:
        return False
    return True


def test_eval_generative_tasks_table_json_and_samples(tiny_hf_dir: Path, tmp_path: Path, capsys) -> None:
    if not _sandbox_works():
        pytest.skip("this system cannot isolate programs")
    out, samples = tmp_path / "results.json", tmp_path / "samples.jsonl"
    rc = main(["eval", "--model", str(tiny_hf_dir), "--tasks", "piqa,nq,gsm8k,humaneval", "--data-dir", str(DATA),
               "--limit", "2", "--max-new-tokens", "6", "--batch-size", "2", "-q", "--device", "cpu", "--output",
               str(out), "--samples-file", str(samples)])  # fmt: skip
    assert rc == 0
    captured = capsys.readouterr()
    table = captured.out
    assert "note: gsm8k: 2 of 2 prompts did not fit the context with 6 new tokens" in captured.err
    assert "note: humaneval: generated code ran with Landlock" in captured.err
    assert "| PIQA | 0 | 2 |" in table
    assert "| NaturalQuestions | 0 | 2 | 1 | exact_match |" in table
    assert "| GSM8K | 8 | 2 | 1 | maj@1 |" in table and "strict_match" in table
    assert "| HumanEval | 0 | 2 | 1 | pass@1 |" in table
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"piqa", "nq_open", "gsm8k", "humaneval"}
    gsm = data["results"]["gsm8k"]
    assert gsm["paper_metric"] == "maj@1" and gsm["n"] == 2 and gsm["num_fewshot"] == 8
    assert len(gsm["maj@1_ci95"]) == 2 and gsm["tokens_per_second"] > 0 and gsm["items_per_second"] > 0
    assert data["results"]["humaneval"]["sandbox"].startswith("Landlock")
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [x["task"] for x in lines] == ["piqa"] * 2 + ["nq_open"] * 2 + ["gsm8k"] * 2 + ["humaneval"] * 2
    he = [x for x in lines if x["task"] == "humaneval"]
    assert all(x["executions"][0]["reason"] and x["prompt"].startswith("def ") for x in he)
    assert all(len(x["generations"]) == 1 and x["finish_reasons"][0] in ("stop", "length") for x in lines[2:])


def test_eval_generative_errors(tiny_hf_dir: Path, tmp_path: Path, capsys) -> None:
    base = ["eval", "--model", str(tiny_hf_dir), "-q", "--device", "cpu"]
    assert main([*base, "--tasks", "gsm8k", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no test data for task gsm8k" in err and "https://huggingface.co/datasets/openai/gsm8k" in err
    assert main([*base, "--tasks", "gsm8k", "--data-dir", str(DATA), "--num-fewshot", "9"]) == 2
    assert "--num-fewshot must be <= 8" in capsys.readouterr().err
    assert main([*base, "--tasks", "humaneval", "--pass-k", "1,x"]) == 2
    assert "--pass-k must be comma-separated integers" in capsys.readouterr().err
    assert main([*base, "--tasks", "mbpp", "--num-samples", "0"]) == 2
    assert "--num-samples must be >= 1" in capsys.readouterr().err
    assert main([*base, "--tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_eval_subprocess_maj_at_k(tiny_hf_dir: Path, tmp_path: Path) -> None:
    """The installed command, sampling several answers per problem."""
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "llamaforge", "eval", "--model", str(tiny_hf_dir), "--tasks", "math",
                           "--data-dir", str(DATA), "--limit", "2", "--num-samples", "2", "--max-new-tokens", "4",
                           "--num-fewshot", "0", "--seed", "3", "-o", str(out), "--device", "cpu"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "LLAMAFORGE_NATIVE": "0"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| MATH | 0 | 2 | 2 | maj@2 |" in proc.stdout
    assert "math: generate" in proc.stderr  # the progress bar
    result = json.loads(out.read_text())["results"]["math"]
    assert result["temperature"] == 0.6 and result["num_samples"] == 2 and "maj@1" in result
    assert result["paper_metric"] == "maj@2"
