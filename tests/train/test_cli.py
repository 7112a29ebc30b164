"""The verbs end to end: prepare-data with a real (tiny, trained here) BPE tokenizer, pretrain from a recipe
with overrides, resume, plot, and the final Hugging Face export that llamaforge.load reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_corpus

from llamaforge.cli import main
from llamaforge.errors import UserError
from llamaforge.train.recipe import Recipe

REPO = Path(__file__).resolve().parents[2]


def _bpe_tokenizer(folder: Path, corpus: Path) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    texts = [json.loads(line)["text"] for f in sorted(corpus.glob("*.jsonl")) for line in f.read_text().splitlines()]
    tok.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder


def test_prepare_pretrain_resume_plot_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = write_corpus(tmp_path / "corpus", n_files=6)
    tok_dir = _bpe_tokenizer(tmp_path / "tok", corpus)
    data = tmp_path / "data"
    assert main(["prepare-data", str(corpus), "-o", str(data), "--tokenizer", str(tok_dir), "--val-fraction", "0.1",
                 "--workers", "2", "--no-progress", "--name", "stories"]) == 0  # fmt: skip
    assert "stories: 240 documents" in capsys.readouterr().out
    meta = json.loads((data / "meta.json").read_text())
    assert meta["bos_id"] == 0 and meta["eos_id"] == 1 and meta["vocab_size"] == 300

    run = tmp_path / "run"
    args = ["pretrain", "--config", str(REPO / "recipes" / "tiny.yaml"), "--data.path", str(data),
            "--train.out_dir", str(run), "--optim.lr", "2e-3", "--set", "train.steps=6", "--set",
            "train.ckpt_interval=3", "--model.overrides", "{vocab_size: 300}", "--logging.tensorboard", "true",
            "--set", "logging.console=false"]  # fmt: skip
    assert main([*args, "--print-recipe"]) == 0
    printed = capsys.readouterr().out
    assert "lr: 0.002" in printed and "steps: 6" in printed
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 6 and summary["start_step"] == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    assert list((run / "tensorboard").iterdir()) or not pytest.importorskip("tensorboard")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(train[-1])
    assert any(r["kind"] == "val" for r in records)

    # resume: continue the same run to 8 steps
    assert main([*args, "--set", "train.steps=8", "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["start_step"] == 6

    pytest.importorskip("matplotlib")
    png = tmp_path / "loss.png"
    assert main(["plot", str(run), "-o", str(png), "--smooth", "2"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # final export: a Hugging Face directory with the tokenizer, readable by llamaforge.load
    import llamaforge

    export = Path(summary["export_dir"])
    assert (export / "config.json").exists()
    llm = llamaforge.load(export)
    assert llm.config.vocab_size == 300 and llm.tokenizer is not None
    assert llm.tokenizer.encode("the cat", bos=True)[0] == 0
    with torch.inference_mode():
        logits = llm.model(torch.tensor([llm.tokenizer.encode("the cat sat", bos=True)]))
    assert torch.isfinite(logits).all()


def test_recipe_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: fast\n")
    with pytest.raises(UserError, match=r"bad.yaml: optim.lr: expected a number, got 'fast'"):
        Recipe.load(bad)
    bad.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(UserError, match=r"unknown field\(s\) \['learning_rate'\]"):
        Recipe.load(bad)
    with pytest.raises(UserError, match=r"train\.parallel 'zero'"):
        Recipe.load(None, {"train.parallel": "zero"})
    assert main(["pretrain", "--set", "optim.lr"]) == 2
    for name in ("tiny", "stories15m", "llama-7b-paper"):
        recipe = Recipe.load(REPO / "recipes" / f"{name}.yaml")
        recipe.model_config()
    paper = Recipe.load(REPO / "recipes" / "llama-7b-paper.yaml")
    assert (paper.optim.lr, paper.optim.beta2, paper.optim.weight_decay, paper.optim.warmup_steps) == (
        3e-4, 0.95, 0.1, 2000)  # fmt: skip
    assert paper.data.seq_len * paper.data.micro_batch_size * paper.data.grad_accum_steps * 128 == 4 * 1024**2
