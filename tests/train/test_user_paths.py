"""The training verbs as a new user runs them (issue 23): any layout of an instruction file trains, a step count
the user typed wins over a recipe's epochs, prepare-data takes the built-in model's name, and data without a
validation split says so with the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llamaforge.cli as cli
from llamaforge.checkpoint import save_model
from llamaforge.config import get_preset
from llamaforge.model import build_model
from llamaforge.train.sft import load_examples, split_examples

REPO = Path(__file__).resolve().parents[2]
RECORDS = [{"instruction": f"Name the number after {i}.", "input": "", "output": f"The number after {i} is {i + 1}."}
           for i in range(64)]  # fmt: skip


def _cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``llamaforge ARGV`` in a fresh process, as a user types it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "llamaforge", *argv], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """A tiny random model with the built-in model's tokenizer and chat template."""
    from llamaforge import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(smollm2_gguf)
    model = build_model(get_preset("tiny", vocab_size=tok.vocab_size, tie_embeddings=True, max_seq_len=256))
    return save_model(model, tmp_path_factory.mktemp("paths") / "base", "hf", tokenizer=tok)


def _write_layout(folder: Path, layout: str) -> Path:
    """The same 64 records in one of the layouts users have."""
    if layout == "json-one-line":
        path = folder / "alpaca_mini.json"
        with path.open("w") as fh:
            json.dump(RECORDS, fh)
    elif layout == "json-indented":
        path = folder / "alpaca_indented.json"
        path.write_text(json.dumps(RECORDS, indent=2))
    elif layout == "jsonl":
        path = folder / "alpaca.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    else:
        datasets = pytest.importorskip("datasets")
        ds = datasets.Dataset.from_list(RECORDS)
        if layout == "hf-to-json-array":
            path = folder / "hf.json"
            ds.to_json(str(path), lines=False)  # one line: [{...},{...},...]
        elif layout == "hf-to-json":
            path = folder / "hf.jsonl"
            ds.to_json(str(path))
        elif layout == "hf-parquet":
            path = folder / "hf.parquet"
            ds.to_parquet(str(path))
        else:
            path = folder / "hf_saved"
            ds.save_to_disk(str(path))
    return path


LAYOUTS = ["json-one-line", "json-indented", "jsonl", "hf-to-json-array", "hf-to-json", "hf-parquet", "hf-saved"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_trains_with_the_same_split(tmp_path: Path, base_dir: Path, layout: str,
                                                 capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    data = _write_layout(tmp_path, layout)
    argv = ["finetune", "--model", str(base_dir), "--data", str(data), "-o", str(tmp_path / "run"), "--steps", "1",
            "--data.seq_len", "96", "--data.micro_batch_size", "4", "--set", "train.save=false"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    summary = json.loads(out[-1])
    assert (summary["examples"], summary["val_examples"], summary["skipped_examples"]) == (61, 3, 0)
    assert any(line.startswith("61 training examples") and "3 validation" in line for line in out)

    # the split keys on each record's index, so it is the same whatever the layout
    from llamaforge import load_tokenizer

    examples, _ = load_examples(data, load_tokenizer(base_dir), 96)
    train, val = split_examples(examples, 0.05, seed=1337)
    reference, _ = load_examples(_write_layout(tmp_path, "jsonl"), load_tokenizer(base_dir), 96)
    assert [e.index for e in val] == [e.index for e in split_examples(reference, 0.05, seed=1337)[1]]
    assert len(train) == 61


def test_one_line_array_names_records_in_errors(tmp_path: Path, base_dir: Path,
                                                capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "a"}, {"output": "b"}]))
    argv = ["finetune", "--model", str(base_dir), "--data", str(path), "--data.seq_len", "96", "--steps", "1",
            "-o", str(tmp_path / "run")]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "record 1 (line 1)" in err and "record 2 (line 1)" in err


def test_a_typed_step_count_wins_over_the_recipe_epochs(tmp_path: Path, base_dir: Path,
                                                        capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    data = _write_layout(tmp_path, "jsonl")
    recipe = REPO / "recipes" / "finetune-lora.yaml"
    argv = ["finetune", "--config", str(recipe), "--model", str(base_dir), "--data", str(data), "-o",
            str(tmp_path / "run"), "--data.seq_len", "96", "--set", "train.save=false"]  # fmt: skip

    assert cli.main([*argv, "--set", "train.steps=4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[-1])["steps"] == 4
    first = out[0]
    assert first.startswith("4 optimizer steps") and "train.steps 4 from the command line" in first
    assert f"in place of finetune.epochs 3 of the recipe {recipe}" in first

    assert cli.main([*argv, "--steps", "2", "--print-recipe"]) == 0
    printed = capsys.readouterr().out
    assert "steps: 2" in printed and "epochs: null" in printed

    # --epochs on the command line wins over a recipe's train.steps the same way, and says so
    steps_recipe = tmp_path / "steps.yaml"
    steps_recipe.write_text("train:\n  steps: 50\nfinetune:\n  method: lora\n")
    argv2 = ["finetune", "--config", str(steps_recipe), *argv[3:]]
    assert cli.main([*argv2, "--epochs", "0.2", "--data.micro_batch_size", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    # 61 examples of ~40 tokens packed 2 per 96-token row: ~31 rows, 8 rows a step -> 0.2 x ~4 steps = 1 step
    steps = json.loads(out[-1])["steps"]
    assert out[0].startswith(f"{steps} optimizer steps (0.2 epochs x ")
    assert "finetune.epochs 0.2 from the command line" in out[0]
    assert steps < 50

    # both in one place is an error naming both
    assert cli.main([*argv, "--steps", "4", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "train.steps (4)" in err and "finetune.epochs (2" in err
    both = tmp_path / "both.yaml"
    both.write_text("train:\n  steps: 10\nfinetune:\n  epochs: 1\n")
    assert cli.main(["finetune", "--config", str(both), "--model", str(base_dir), "--data", str(data)]) == 2
    assert f"the recipe {both} sets both train.steps (10) and finetune.epochs (1)" in capsys.readouterr().err


def test_prepare_data_takes_the_builtin_name_and_warns_without_validation(
    tmp_path: Path, smollm2_gguf: Path, capsys: pytest.CaptureFixture
) -> None:
    corpus = tmp_path / "story.txt"
    corpus.write_text("Once upon a time there was a small cat who liked to sit in the sun. " * 40)
    data = tmp_path / "data"
    run = _cli("prepare-data", str(corpus), "-o", str(data), "--tokenizer", "smollm2-135m-instruct", "--no-progress")
    assert run.returncode == 0, run.stderr
    meta = json.loads((data / "meta.json").read_text())
    assert meta["tokenizer"] == "smollm2-135m-instruct" and meta["vocab_size"] == 49152
    assert "0 validation tokens" in run.stderr and "--val-fraction" in run.stderr  # one file is one document

    # pretraining on it trains, warns that there is no validation loss and says how to get one
    argv = ["pretrain", "--config", str(REPO / "recipes" / "tiny.yaml"), "--data.path", str(data),
            "--model.overrides", "{vocab_size: 49152}", "--set", "train.steps=2", "--data.seq_len", "32",
            "--train.out_dir", str(tmp_path / "run"), "--set", "train.save=false",
            "--set", "logging.console=false"]  # fmt: skip
    with pytest.warns(UserWarning, match=r"validation tokens.*no validation loss.*--val-fraction"):
        assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_loss"] is None

    # a name that is nothing says what was tried
    assert cli.main(["prepare-data", str(corpus), "-o", str(tmp_path / "d2"), "--tokenizer", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "built-in" in err
