"""Preference tuning: pair records and their errors, rendering, response log-probabilities, the losses, the
loader, the reference (adapters off, precomputed and cached), and ``finetune --method dpo`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_sft import ChatByteTokenizer

import llamaforge.cli as cli
from llamaforge.checkpoint import save_model
from llamaforge.config import get_preset
from llamaforge.errors import UserError
from llamaforge.model import build_model
from llamaforge.train.dpo import PreferenceLoss, precompute_reference, preference_losses, sequence_logps
from llamaforge.train.lora import LoraConfig, adapters_disabled, apply_lora, lora_modules
from llamaforge.train.loss import IGNORE_INDEX
from llamaforge.train.mesh import Layout, ParallelDims
from llamaforge.train.preference import PairLoader, PairValidation, collate_pairs, load_pairs, record_pair
from llamaforge.train.sft import FinetuneRecipe


@pytest.fixture
def tok() -> ChatByteTokenizer:
    return ChatByteTokenizer()


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# Records ---------------------------------------------------------------------------------------------------
def test_record_layouts() -> None:
    strings = record_pair({"prompt": "q", "chosen": "A", "rejected": "a"})
    assert strings == (_user("q"), _assistant("A"), _assistant("a"))
    chat = record_pair({"prompt": [{"role": "system", "content": "s"}, *_user("q")], "chosen": _assistant("A"),
                        "rejected": "a"})  # fmt: skip
    assert chat[0][0]["role"] == "system" and chat[2] == _assistant("a")
    turns = [*_user("q1"), *_assistant("r1"), *_user("q2")]
    implicit = record_pair({"chosen": [*turns, *_assistant("A")], "rejected": [*turns, *_assistant("a")]})
    assert implicit == (turns, _assistant("A"), _assistant("a"))
    # UltraFeedback: the prompt string repeats the conversations' user turn, which is not rendered twice
    ultra = record_pair({"prompt": "q", "chosen": [*_user("q"), *_assistant("A")],
                         "rejected": [*_user("q"), *_assistant("a")]})  # fmt: skip
    assert ultra == (_user("q"), _assistant("A"), _assistant("a"))
    assert record_pair({"prompt": "q", "chosen": _assistant("A"), "rejected": _assistant("a")}) == strings


def test_hugging_face_preference_files(tmp_path: Path, tok: ChatByteTokenizer) -> None:
    """A saved ``datasets`` directory and a Parquet file (messages as lists of structs) give the pairs of the same
    records in JSONL, in order and with their record numbers."""
    import datasets

    records = [{"prompt": f"q{i}", "chosen": [*_user(f"q{i}"), *_assistant(f"A{i}")],
                "rejected": [*_user(f"q{i}"), *_assistant(f"b{i}")]} for i in range(4)]  # fmt: skip
    records[2]["rejected"] = records[2]["chosen"]  # no preference: skipped, named by its record number
    ds = datasets.Dataset.from_list(records)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "p.parquet"))
    want, _ = load_pairs(_write(tmp_path / "p.jsonl", records), tok, 64, "chat")
    for source in (tmp_path / "saved", tmp_path / "p.parquet"):
        pairs, report = load_pairs(source, tok, 64, "chat")
        assert [(p.index, p.prompt, p.chosen, p.rejected) for p in pairs] == [
            (p.index, p.prompt, p.chosen, p.rejected) for p in want
        ]
        assert [p.index for p in pairs] == [0, 1, 3] and tok.decode(pairs[0].prompt).count("q0") == 1
        assert report.skipped == {"identical responses": [("record 3", report.skipped["identical responses"][0][1])]}


def test_bad_pairs_are_reported_by_line(tmp_path: Path, tok: ChatByteTokenizer) -> None:
    path = _write(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "A", "rejected": "a"},                       # 1 ok
        {"prompt": "q", "chosen": "A"},                                         # 2 no rejected
        {"prompt": "q", "chosen": "  ", "rejected": "a"},                      # 3 empty chosen
        {"prompt": "q", "chosen": "same", "rejected": "same"},                  # 4 identical
        {"prompt": "x" * 300, "chosen": "A", "rejected": "a"},                  # 5 prompt fills the context
        {"prompt": "q", "chosen": "A" * 300, "rejected": "a"},                  # 6 response too long
        {"chosen": "A", "rejected": "a"},                                       # 7 no prompt, plain strings
        "{oops",                                                                # 8 invalid JSON
        {"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": "a"},    # 9 bad message
        {"chosen": [*_user("q"), *_assistant("B")], "rejected": [*_user("q"), *_assistant("b")]},  # 10 ok
    ])  # fmt: skip
    pairs, report = load_pairs(path, tok, seq_len=256, template="chat")
    assert [p.line for p in pairs] == [1, 10] and [p.index for p in pairs] == [0, 9]
    where = {reason: [w for w, _ in items] for reason, items in report.skipped.items()}
    assert where == {"missing field": ["line 2", "line 7"], "empty response": ["line 3"],
                     "identical responses": ["line 4"], "prompt too long": ["line 5"], "too long": ["line 6"],
                     "invalid JSON": ["line 8"], "bad field": ["line 9"]}  # fmt: skip
    text = report.summary(noun="pairs")
    assert "2 of 10 pairs kept, 8 skipped" in text and "line 5: the prompt is" in text

    only_bad = _write(tmp_path / "bad.json", [])
    only_bad.write_text(json.dumps([{"prompt": "q", "chosen": "A"}, {"prompt": "q", "chosen": "x", "rejected": "x"}]))
    with pytest.raises(UserError, match=r"(?s)no usable pairs.*record 1 \(line 1\).*record 2 \(line 1\)"):
        load_pairs(only_bad, tok, seq_len=256)


def test_rendering_scores_only_the_final_response(tok: ChatByteTokenizer, tmp_path: Path) -> None:
    turns = [*_user("hi"), *_assistant("hello"), *_user("2+2?")]
    path = _write(tmp_path / "p.jsonl", [{"prompt": turns, "chosen": _assistant("4"), "rejected": _assistant("five")}])
    (pair,), _ = load_pairs(path, tok, 256, "chat")
    assert tok.decode(pair.prompt).endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert "hello" in tok.decode(pair.prompt)  # the earlier assistant turn is context, not scored
    assert tok.decode(pair.chosen) == "4<|im_end|>\n" and tok.decode(pair.rejected) == "five<|im_end|>\n"
    assert all(pair.chosen_mask) and all(pair.rejected_mask)
    batch = collate_pairs([pair], pad_id=0)
    scored = [[int(x) for x in row[row != IGNORE_INDEX]] for row in batch["targets"]]
    assert scored == [pair.chosen, pair.rejected]

    alpaca, _ = load_pairs(_write(tmp_path / "a.jsonl", [{"prompt": "q", "chosen": "A", "rejected": "a"}]), tok, 256,
                           "alpaca")  # fmt: skip
    assert alpaca[0].chosen == [*b"A", tok.eos_id] and tok.decode(alpaca[0].prompt).endswith("### Response:\n")


# Log-probabilities and losses ------------------------------------------------------------------------------
def _batch(vocab: int, rows: int = 4, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, length), generator=g)
    targets = torch.full_like(tokens, IGNORE_INDEX)
    for r in range(rows):
        start, end = 3 + r, length - r  # a prompt, a response, then padding
        targets[r, start - 1 : end - 1] = tokens[r, start:end]
    return tokens, targets


def test_sequence_logps_equal_full_logits_with_gradients(tiny_model: torch.nn.Module) -> None:
    tokens, targets = _batch(tiny_model.config.vocab_size)
    tiny_model.requires_grad_(True)
    ours, counts = sequence_logps(tiny_model, tokens, targets, chunk_tokens=5)  # several chunks
    (ours * torch.arange(1.0, 5.0)).sum().backward()
    mine = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    logp = F.log_softmax(tiny_model(tokens).float(), dim=-1)
    valid = targets != IGNORE_INDEX
    ref = (logp.gather(2, targets.clamp(min=0)[..., None])[..., 0] * valid).sum(1)
    (ref * torch.arange(1.0, 5.0)).sum().backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == valid.sum(1).tolist()
    for n, p in tiny_model.named_parameters():
        torch.testing.assert_close(mine[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_loss_formulas() -> None:
    c, r = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
    rc, rr = torch.tensor([-11.0, -19.0]), torch.tensor([-11.0, -16.0])
    nc, nr = torch.tensor([5, 10]), torch.tensor([4, 5])
    loss, wc, wr = preference_losses(c, r, rc, rr, n_chosen=nc, n_rejected=nr, loss="sigmoid", beta=0.1)
    z = 0.1 * ((c - rc) - (r - rr))
    torch.testing.assert_close(loss, torch.log1p(torch.exp(-z)))
    torch.testing.assert_close(wc - wr, z)
    loss, _, _ = preference_losses(c, r, rc, rr, n_chosen=nc, n_rejected=nr, loss="ipo", beta=0.1)
    torch.testing.assert_close(loss, ((c - rc) / nc - (r - rr) / nr - 5.0) ** 2)
    loss, wc, _ = preference_losses(c, r, None, None, n_chosen=nc, n_rejected=nr, loss="simpo", beta=2.0, gamma=0.5)
    torch.testing.assert_close(loss, torch.log1p(torch.exp(-(2.0 * (c / nc - r / nr) - 0.5))))
    torch.testing.assert_close(wc, 2.0 * c / nc)
    with pytest.raises(ValueError, match="reference"):
        preference_losses(c, r, None, None, n_chosen=nc, n_rejected=nr, loss="sigmoid")


def test_rpo_adds_the_chosen_tokens_mean_nll(tiny_model: torch.nn.Module) -> None:
    """RPO: the preference loss plus alpha x the NLL of the chosen responses, one mean over all their tokens in the
    batch (the two chosen responses have 9 and 7 tokens: not a mean of per-pair means), with its gradient; a pair
    of weight 0 counts in neither; ``nll_loss`` is logged only with RPO on."""
    tokens, targets = _batch(tiny_model.config.vocab_size)
    vocab = tiny_model.config.vocab_size
    tiny_model.requires_grad_(True)
    with torch.no_grad():
        ref_logps = sequence_logps(tiny_model, tokens, targets)[0] + torch.tensor([0.5, -0.3, 0.2, 0.4])

    def grads(value: torch.Tensor) -> dict[str, torch.Tensor]:
        tiny_model.zero_grad()
        value.backward()
        return {n: p.grad.clone() for n, p in tiny_model.named_parameters()}

    ones = torch.ones(2)
    plain_sum, n, plain = PreferenceLoss(tiny_model)(tokens, targets, ones, ref_logps=ref_logps)
    rpo_sum, _, metrics = PreferenceLoss(tiny_model, rpo_alpha=0.7)(tokens, targets, ones, ref_logps=ref_logps)
    logits = tiny_model(tokens[:2]).float()  # the chosen rows, every logit: an independent token-mean NLL
    nll = F.cross_entropy(logits.reshape(-1, vocab), targets[:2].reshape(-1), ignore_index=IGNORE_INDEX)
    per_pair = [F.cross_entropy(logits[i], targets[i], ignore_index=IGNORE_INDEX).item() for i in range(2)]
    assert abs(nll.item() - sum(per_pair) / 2) > 1e-3  # the two means differ here: the test tells them apart
    assert "nll_loss" not in plain
    assert (metrics["nll_loss"] / n).item() == pytest.approx(nll.item(), rel=1e-5)
    assert ((rpo_sum - plain_sum) / n).item() == pytest.approx(0.7 * nll.item(), rel=1e-5)
    g_rpo, g_plain, g_nll = grads(rpo_sum / n), grads(plain_sum / n), grads(nll)
    for name in g_rpo:
        torch.testing.assert_close(g_rpo[name], g_plain[name] + 0.7 * g_nll[name], atol=1e-6, rtol=1e-4, msg=name)
    # a padding pair (weight 0, as the loaders add to fill a batch): the NLL is the other pair's alone
    half = torch.tensor([1.0, 0.0])
    _, n, metrics = PreferenceLoss(tiny_model, rpo_alpha=0.7)(tokens, targets, half, ref_logps=ref_logps)
    assert n.item() == 1 and (metrics["nll_loss"] / n).item() == pytest.approx(per_pair[0], rel=1e-5)


def test_adapter_off_reference_is_the_base(tiny_model: torch.nn.Module) -> None:
    tokens, targets = _batch(tiny_model.config.vocab_size)
    with torch.no_grad():
        base, _ = sequence_logps(tiny_model, tokens, targets)
    apply_lora(tiny_model, LoraConfig(r=4, alpha=8.0, targets="wq,wv,w2,output"))
    for m in lora_modules(tiny_model).values():
        torch.nn.init.normal_(m.lora_B, std=0.1)
    with torch.no_grad():
        adapted, _ = sequence_logps(tiny_model, tokens, targets)
        with adapters_disabled(tiny_model):
            off, _ = sequence_logps(tiny_model, tokens, targets)
        again, _ = sequence_logps(tiny_model, tokens, targets)
    torch.testing.assert_close(off, base)
    assert not torch.allclose(adapted, base) and torch.equal(again, adapted)
    # the adapter-off loss module: at the start (policy == reference) the loss is log 2
    weights = torch.ones(2)
    for m in lora_modules(tiny_model).values():
        torch.nn.init.zeros_(m.lora_B)
    loss, n, metrics = PreferenceLoss(tiny_model, reference="adapter-off")(tokens, targets, weights)
    assert n.item() == 2 and loss.item() == pytest.approx(2 * torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    assert metrics["rewards/margins"].item() == 0 and metrics["rewards/accuracies"].item() == 0


def test_precomputed_reference_and_its_cache(tmp_path: Path, tiny_model: torch.nn.Module,
                                             tok: ChatByteTokenizer) -> None:  # fmt: skip
    model = build_model(get_preset("tiny", vocab_size=260))
    records = [{"prompt": f"q{i}", "chosen": f"A{i}", "rejected": f"b{i}{i}"} for i in range(5)]
    pairs, _ = load_pairs(_write(tmp_path / "p.jsonl", records), tok, 64, "chat")
    cache = tmp_path / "run" / "reference_logps.safetensors"
    assert (
        precompute_reference(model, pairs, 2, 0, device=torch.device("cpu"), cache=cache, progress=False) == "computed"
    )
    batch = collate_pairs(pairs, 0)
    with torch.no_grad():
        direct, _ = sequence_logps(model, batch["tokens"], batch["targets"])
    torch.testing.assert_close(batch["ref_logps"].float(), direct, atol=1e-5, rtol=1e-6)
    again, _ = load_pairs(tmp_path / "p.jsonl", tok, 64, "chat")
    assert precompute_reference(model, again, 2, 0, device=torch.device("cpu"), cache=cache, progress=False) == "cached"
    assert [p.ref_chosen for p in again] == [p.ref_chosen for p in pairs]
    with torch.no_grad():
        model.norm.weight.mul_(1.5)  # another model: the cache does not apply
    cpu = torch.device("cpu")
    fresh, _ = load_pairs(tmp_path / "p.jsonl", tok, 64, "chat")
    assert precompute_reference(model, fresh, 2, 0, device=cpu, cache=cache, progress=False) == "computed"
    cache.write_bytes(b"not a safetensors file")  # something else at that path: warned about and replaced
    with pytest.warns(UserWarning, match="unreadable reference cache"):
        assert precompute_reference(model, fresh, 2, 0, device=cpu, cache=cache, progress=False) == "computed"
    assert precompute_reference(model, fresh, 2, 0, device=cpu, cache=cache, progress=False) == "cached"


def test_pair_loader_ranks_and_resume(tmp_path: Path, tok: ChatByteTokenizer) -> None:
    records = [{"prompt": f"q{i}", "chosen": "A" * (1 + i % 5), "rejected": "b" * (2 + i % 3)} for i in range(21)]
    pairs, _ = load_pairs(_write(tmp_path / "p.jsonl", records), tok, 64, "chat")
    one = PairLoader(pairs, 2, 2, seed=1)
    steps = [one.next_step() for _ in range(8)]  # crosses epochs (4 pairs a step, 21 pairs)
    assert one.epoch >= 1 and len(steps[0]) == 2 and steps[0][0]["tokens"].shape[0] == 4
    ranks = [PairLoader(pairs, 1, 2, rank=r, world_size=2, seed=1) for r in range(2)]
    for step in steps[:3]:
        parts = [rk.next_step() for rk in ranks]
        for m in range(2):
            ours = sorted(int((b["targets"] != IGNORE_INDEX).sum()) for part in parts for b in part[m : m + 1])
            assert sum(ours) == int((step[m]["targets"] != IGNORE_INDEX).sum())
    fresh = PairLoader(pairs, 2, 2, seed=1)
    for _ in range(3):
        fresh.next_step()
    resumed = PairLoader(pairs, 2, 2, seed=1)
    resumed.load_state_dict(fresh.state_dict())
    assert all(torch.equal(a[0]["tokens"], b[0]["tokens"]) for a, b in zip([resumed.next_step()], steps[3:4]))
    with pytest.raises(UserError, match="pairs_per_step"):
        PairLoader(pairs, 4, 2, seed=1).load_state_dict(fresh.state_dict())
    val = [PairValidation(pairs[:5], 2, rank=r, world_size=2) for r in range(2)]
    assert len(val[0]) == len(val[1]) == 2
    assert sum(float(b["weights"].sum()) for v in val for b in v) == 5


def test_recipe_checks() -> None:
    base = {"model.from_checkpoint": "m", "finetune.objective": "dpo"}
    with pytest.raises(UserError, match="dpo_reference adapter-off needs LoRA"):
        FinetuneRecipe.load(None, {**base, "finetune.method": "full", "finetune.dpo_reference": "adapter-off"})
    with pytest.raises(UserError, match="dpo_loss 'kto'"):
        FinetuneRecipe.load(None, {**base, "finetune.dpo_loss": "kto"})
    with pytest.raises(UserError, match="objective 'rlhf'"):
        FinetuneRecipe.load(None, {"model.from_checkpoint": "m", "finetune.objective": "rlhf"})
    with pytest.raises(UserError, match=r"dpo runs under data parallelism only .* not with parallel.tp 2 and "
                                        r"parallel.pp 2: set parallel.tp and parallel.pp to 1"):  # fmt: skip
        FinetuneRecipe.load(None, {**base, "parallel.tp": "2", "parallel.pp": "2"})


@pytest.mark.parametrize("dims", [ParallelDims(1, 2, 1), ParallelDims(1, 1, 2)])
def test_mesh_refuses_preference_loss_under_tensor_or_pipeline_parallel(tiny_model: torch.nn.Module,
                                                                        dims: ParallelDims) -> None:  # fmt: skip
    """The runner drives any loss module under data parallelism; tensor and pipeline parallelism compute the
    next-token loss only, and say so (before any weight is split)."""
    from llamaforge.train.parallel import parallelize_model

    what = "parallel.tp 2" if dims.tp > 1 else "parallel.pp 2"
    with pytest.raises(UserError, match=f"{what}: the PreferenceLoss objective runs under data parallelism only"):
        parallelize_model(tiny_model, Layout(dims), torch.device("cpu"), PreferenceLoss(tiny_model))
    assert len(tiny_model.layers) == tiny_model.config.n_layers  # untouched


def test_rpo_alpha_recipe_field_and_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = {"model.from_checkpoint": "m", "finetune.objective": "dpo"}
    assert FinetuneRecipe.load(None, base).finetune.rpo_alpha is None  # off by default
    assert FinetuneRecipe.load(None, {**base, "finetune.rpo_alpha": "0.5"}).finetune.rpo_alpha == 0.5
    assert FinetuneRecipe.load(None, {**base, "finetune.rpo_alpha": "0"}).finetune.rpo_alpha == 0
    for bad in ("-0.5", ".nan", "nan", "inf"):
        with pytest.raises(UserError, match=r"finetune.rpo_alpha \(the weight of the chosen responses' NLL\) must be "
                                            r"a number >= 0, got (-0.5|nan|inf)"):  # fmt: skip
            FinetuneRecipe.load(None, {**base, "finetune.rpo_alpha": bad})
    with pytest.raises(UserError, match=r"finetune\.rpo_alpha: expected a number, got 'lots'"):
        FinetuneRecipe.load(None, {**base, "finetune.rpo_alpha": "lots"})
    with pytest.raises(UserError, match=r"rpo_alpha 1.0 applies to preference tuning only .* objective is 'sft'"):
        FinetuneRecipe.load(None, {"model.from_checkpoint": "m", "finetune.rpo_alpha": "1"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("finetune:\n  objective: dpo\n  rpo_alpha: -1\n")
    with pytest.raises(UserError, match=rf"{recipe}.*finetune.rpo_alpha .* must be a number >= 0, got -1"):
        FinetuneRecipe.load(recipe, {"model.from_checkpoint": "m"})
    # the flag: --rpo-alpha sets finetune.rpo_alpha; a bad value is a clear error (exit 2), not a traceback
    import yaml

    argv = ["finetune", "--method", "dpo", "--model", "m", "--data", "d.jsonl"]
    assert cli.main([*argv, "--rpo-alpha", "0.25", "--print-recipe"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["finetune"]["rpo_alpha"] == 0.25
    for bad in ("-1", "nan"):
        assert cli.main([*argv, "--rpo-alpha", bad, "--print-recipe"]) == 2
        assert "finetune.rpo_alpha (the weight of the chosen responses' NLL) must be a number >= 0" in (
            capsys.readouterr().err
        )


# The verb ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    from llamaforge import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(smollm2_gguf)
    model = build_model(get_preset("tiny", vocab_size=tok.vocab_size, tie_embeddings=True, max_seq_len=256))
    return save_model(model, tmp_path_factory.mktemp("dpo") / "base", "hf", tokenizer=tok)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    records = [{"prompt": f"What is {i} plus 1?", "chosen": f"{i} PLUS 1 IS {i + 1}.",
                "rejected": f"{i} plus 1 is {i + 1}."} for i in range(24)]  # fmt: skip
    records.insert(5, {"prompt": "q", "chosen": "same", "rejected": "same"})
    return _write(tmp_path_factory.mktemp("dpodata") / "pairs.jsonl", records)


def _dpo(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--method", "dpo", "--model", str(base), "--data", str(data), "-o", str(out),
            "--data.seq_len", "64", "--data.micro_batch_size", "4", "--train.log_interval", "1", "--lr", "5e-3",
            "--set", "logging.console=false", *extra]  # fmt: skip


def _summary(capsys: pytest.CaptureFixture) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["lora", "full", "qlora"])
def test_finetune_dpo_methods(tmp_path: Path, base_dir: Path, pairs_file: Path, method: str,
                              capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    out = tmp_path / method
    argv = _dpo(base_dir, pairs_file, out, "--finetune.method", method, "--steps", "4", "--train.ckpt_interval", "2")
    with pytest.warns(UserWarning, match=r"(?s)1 skipped.*identical responses.*line 6"):
        assert cli.main(argv) == 0
    summary = _summary(capsys)
    assert summary["objective"] == "dpo" and summary["method"] == method and summary["skipped_examples"] == 1
    assert summary["reference"] == ("precomputed" if method == "full" else "adapter-off")
    assert summary["rewards/margins"] > 0 and summary["val_rewards/accuracies"] is not None
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected"} <= set(train[-1])  # fmt: skip
    assert train[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start: log 2
    assert train[-1]["loss"] < train[0]["loss"]
    if method == "full":
        assert (out / "final" / "config.json").exists() and (out / "reference_logps.safetensors").exists()
        # resuming reads the reference from the cache and continues to the same result
        once = summary["loss"]
        import shutil

        shutil.rmtree(out / "checkpoints" / "step_00000004")
        with pytest.warns(UserWarning):
            assert cli.main([*argv, "--resume"]) == 0
        resumed = _summary(capsys)
        assert resumed["reference_cache"] == "cached" and resumed["start_step"] == 2
        assert resumed["loss"] == pytest.approx(once, rel=1e-5)
    else:
        assert (out / "adapter" / "adapter_config.json").exists()


def test_finetune_simpo_and_ipo(tmp_path: Path, base_dir: Path, pairs_file: Path,
                                capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    for loss in ("simpo", "ipo"):
        with pytest.warns(UserWarning):
            assert cli.main(_dpo(base_dir, pairs_file, tmp_path / loss, "--loss", loss, "--steps", "2",
                                 "--set", "train.save=false")) == 0  # fmt: skip
        summary = _summary(capsys)
        assert summary["loss_type"] == loss and summary["reference"] == ("none" if loss == "simpo" else "adapter-off")
        assert summary["beta"] == (2.0 if loss == "simpo" else 0.1)


def test_finetune_dpo_with_rpo_logs_nll_loss(tmp_path: Path, base_dir: Path, pairs_file: Path,
                                             capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """``--rpo-alpha``: each step logs ``nll_loss``; at the first step (policy = reference: DPO's loss is log 2) the
    loss is log 2 + alpha x nll_loss; the validation pairs get ``val_nll_loss``."""
    argv = _dpo(base_dir, pairs_file, tmp_path / "rpo", "--rpo-alpha", "0.5", "--steps", "2",
                "--train.eval_interval", "2", "--set", "train.save=false")  # fmt: skip
    with pytest.warns(UserWarning):
        assert cli.main(argv) == 0
    summary = _summary(capsys)
    assert summary["rpo_alpha"] == 0.5 and summary["nll_loss"] > 0 and summary["val_nll_loss"] > 0
    train = [json.loads(x) for x in (tmp_path / "rpo" / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    first = train[0]
    assert first["nll_loss"] > 1.0  # a random model: the chosen tokens are far from likely
    assert first["loss"] == pytest.approx(0.693147 + 0.5 * first["nll_loss"], abs=1e-4)


def test_finetune_dpo_bad_data_names_the_line(tmp_path: Path, base_dir: Path, capsys: pytest.CaptureFixture) -> None:
    bad = _write(
        tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "A"}, {"prompt": "q", "chosen": "", "rejected": "b"}]
    )
    assert cli.main(_dpo(base_dir, bad, tmp_path / "o", "--steps", "1")) == 2
    err = capsys.readouterr().err
    assert "no usable pairs" in err and "line 1: no 'rejected'" in err and "line 2: 'chosen' is empty" in err


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("method,parallel", [("lora", "ddp"), ("full", "fsdp")])
def test_torchrun_two_processes_match_one(tmp_path: Path, base_dir: Path, pairs_file: Path, method: str,
                                          parallel: str) -> None:  # fmt: skip
    """``torchrun -m llamaforge finetune --method dpo`` on 2 CPU processes (DDP with the adapter-off reference,
    FSDP2 with the precomputed one) gives the losses and rewards of one process on the same global batch."""
    import os
    import socket
    import subprocess
    import sys

    def run(out: Path, *launch: str, micro: str, extra: tuple[str, ...] = ()) -> list[dict]:
        argv = [*launch, "-m", "llamaforge", *_dpo(base_dir, pairs_file, out, "--finetune.method", method,
                "--steps", "3", "--data.micro_batch_size", micro, "--set", "train.save=false", "--lr", "5e-4",
                "--lora-dropout", "0", *extra)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=800)
        assert done.returncode == 0, done.stderr[-3000:]
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one = run(tmp_path / "one", sys.executable, micro="4")
    two = run(tmp_path / "two", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_addr", "127.0.0.1", "--master_port", str(port), micro="2",
              extra=("--train.parallel", parallel))  # fmt: skip
    # (no LoRA dropout: its masks differ between ranks and one process.) The first step's gradient is the same (its
    # norm, before any update); later steps see weights that Adam's near-sign first updates move by lr wherever a
    # gradient element is at rounding level, so they agree to ~1e-4
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-5)
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-4, abs=1e-5), key
