"""Preference tuning against Hugging Face TRL's ``DPOTrainer`` on transformers' LlamaForCausalLM.

The same tiny random model (a policy that differs from its reference, written with ``save_model(..., "hf")``
and the built-in model's tokenizer and chat template), the same preference records: TRL's tokenization of each
record equals ours (plain strings, which we render in the chat format, given to TRL as one user and one
assistant turn); on the same batch the loss, every gradient and the logged rewards agree, also with RPO's NLL term
(our ``rpo_alpha``; TRL 1.x spells it ``loss_type=["sigmoid", "sft"], loss_weights=[1, alpha]``). Full tuning uses an
explicit reference model on both sides; LoRA uses each side's adapter-disabled base (PEFT's ``disable_adapter``,
our ``adapters_disabled``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llamaforge.checkpoint import load_model, save_model
from llamaforge.checkpoint.hf import _Layout, permute_to_hf
from llamaforge.config import get_preset
from llamaforge.model import build_model
from llamaforge.train.dpo import PreferenceLoss, sequence_logps
from llamaforge.train.lora import LoraConfig, apply_lora, lora_modules, save_adapter
from llamaforge.train.preference import collate_pairs, load_pairs

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.conformance

STRINGS = [
    {"prompt": "What is 2 plus 2?", "chosen": "2 PLUS 2 IS 4.", "rejected": "2 plus 2 is 4."},
    {"prompt": "Name a colour of the sky.", "chosen": "BLUE.", "rejected": "The sky is usually blue on a clear day."},
    {"prompt": "Capital of France?", "chosen": "PARIS.", "rejected": "It is Paris, a city on the Seine."},
    {"prompt": "Say hi.", "chosen": "HI!", "rejected": "hello there"},
]  # fmt: skip
MESSAGES = [  # the chat layout: a system turn, a multi-turn prompt
    {"prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"}],
     "chosen": [{"role": "assistant", "content": "PARIS."}],
     "rejected": [{"role": "assistant", "content": "It is Paris, a city on the Seine."}]},
    {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Count to three."}],
     "chosen": [{"role": "assistant", "content": "ONE, TWO, THREE."}],
     "rejected": [{"role": "assistant", "content": "one two three"}]},
    {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": [{"role": "assistant", "content": "HI!"}],
     "rejected": [{"role": "assistant", "content": "hello there"}]},
]  # fmt: skip
LAYOUTS = {"strings": STRINGS, "messages": MESSAGES}
BETA = 0.1
# TRL scores tokens with a float32 online logsumexp over vocabulary tiles: its summed response log-probabilities
# (about -100 here, ~11 per token over a 49K vocabulary) differ from exact ones (ours agree with transformers'
# float64 logits to 1e-5) by up to ~3e-3. The loss moves by at most beta / 2 = 0.05 per unit of log-ratio.
LOGPS_ATOL = 3e-3
# sigmoid: |d loss / d logp| <= beta / 2 per sequence. IPO: (delta - 1/(2 beta))^2 with delta ~ 0 moves by
# 2 / (2 beta) / n per unit of log-prob, about 1 here, on a loss of ~25: a relative bound.
LOSS_TOL = {"sigmoid": {"atol": 2 * BETA / 2 * LOGPS_ATOL, "rtol": 0}, "ipo": {"atol": 0, "rtol": 5e-4}}
# RPO's weight on the NLL of the chosen tokens (the RPO paper's and TRL's documented 1.0). The NLL is a mean over
# tokens: TRL's per-token error (~3e-3 over ~100 tokens) moves it far less than the sigmoid tolerance above.
RPO_ALPHA = 1.0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> dict[str, Path]:
    """``ref``: a tiny random model; ``policy``: the same plus noise (so the log-ratios are not zero); ``data``."""
    from llamaforge import load_tokenizer

    root = tmp_path_factory.mktemp("dpo_trl")
    tok = load_tokenizer(smollm2_gguf)
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=256))
    save_model(model, root / "ref", "hf", tokenizer=tok)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    save_model(model, root / "policy", "hf", tokenizer=tok)
    out = {"ref": root / "ref", "policy": root / "policy"}
    for layout, records in LAYOUTS.items():
        out[layout] = root / f"{layout}.jsonl"
        out[layout].write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def _hf(path: Path):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")


def _trl_trainer(tmp_path: Path, models: dict[str, Path], layout: str, loss: str, model, ref_model, peft_config=None,
                 rpo_alpha: float | None = None):  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(models["policy"])
    # TRL 1.x has no rpo_alpha: RPO is its "sft" loss (the chosen tokens' mean NLL) added with weight alpha
    losses, weights = ([loss], None) if rpo_alpha is None else ([loss, "sft"], [1.0, rpo_alpha])
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, loss_type=losses, loss_weights=weights,
                         report_to=[], per_device_train_batch_size=len(LAYOUTS[layout]), max_length=None,
                         use_cpu=True, dataset_num_proc=None)  # fmt: skip
    records = LAYOUTS[layout]
    if layout == "strings":  # we render plain strings as a user turn and assistant turns: TRL's chat layout
        records = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                    **{k: [{"role": "assistant", "content": r[k]}] for k in ("chosen", "rejected")}}
                   for r in records]  # fmt: skip
    dataset = datasets.Dataset.from_list(records)
    return trl.DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config)  # fmt: skip


def _same_tokens_and_batch(trainer, pairs) -> dict[str, torch.Tensor]:
    """TRL tokenized every record as we did; its collator's batch of our pairs."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = list(trainer.train_dataset)
    for row, pair in zip(rows, pairs):
        assert row["prompt_ids"] == pair.prompt
        assert row["chosen_ids"] == pair.chosen and row["rejected_ids"] == pair.rejected
    examples = [{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in pairs]
    return DataCollatorForPreference(pad_token_id=trainer.pad_token_id if hasattr(trainer, "pad_token_id") else 0)(
        examples
    )


def _assert_grad_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Equal up to TRL's float32 log-probabilities: relative error of the whole tensor (norm) below 1e-3."""
    assert theirs is not None and ours.shape == theirs.shape, what
    error = (ours - theirs).norm() / theirs.norm().clamp(min=1e-12)
    assert error < 1e-3, f"{what}: relative error {error:.2e}"


def _check_metrics(trainer, metrics: dict[str, torch.Tensor], n: torch.Tensor) -> None:
    logged = trainer._metrics["train"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):  # fmt: skip
        tol = LOGPS_ATOL if key.startswith("logps") else 2 * BETA * LOGPS_ATOL
        assert (metrics[key] / n).item() == pytest.approx(logged[key][-1], rel=0, abs=tol), key


@pytest.mark.parametrize(
    "loss,layout,rpo_alpha",
    [
        ("sigmoid", "strings", None),
        ("sigmoid", "messages", None),
        ("ipo", "messages", None),
        ("sigmoid", "messages", RPO_ALPHA),
    ],
)
def test_full_tuning_loss_gradient_and_metrics_equal_trl(tmp_path: Path, models: dict[str, Path], loss: str,
                                                         layout: str, rpo_alpha: float | None) -> None:  # fmt: skip
    from llamaforge import load_tokenizer

    hf_policy, hf_ref = _hf(models["policy"]), _hf(models["ref"])
    trainer = _trl_trainer(tmp_path, models, layout, loss, hf_policy, hf_ref, rpo_alpha=rpo_alpha)
    pairs, report = load_pairs(models[layout], load_tokenizer(models["policy"]), 256, "chat")
    assert report.kept == len(LAYOUTS[layout])
    inputs = _same_tokens_and_batch(trainer, pairs)
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, inputs)
    theirs.backward()

    policy, _ = load_model(models["policy"], dtype=torch.float32)
    policy.requires_grad_(True)
    ref, _ = load_model(models["ref"], dtype=torch.float32)
    batch = collate_pairs(pairs, pad_id=0)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(ref, batch["tokens"], batch["targets"])
    loss_sum, n, metrics = PreferenceLoss(policy, loss, BETA, reference="precomputed", rpo_alpha=rpo_alpha)(
        **batch, ref_logps=ref_logps
    )
    ours = loss_sum / n
    ours.backward()
    torch.testing.assert_close(ours, theirs.detach(), **LOSS_TOL[loss])
    _check_metrics(trainer, metrics, n)
    if rpo_alpha is not None:
        # TRL logs no NLL: its loss less our DPO loss alone (equal to TRL's in the cases above) is alpha x our nll_loss
        with torch.no_grad():
            dpo_sum, _, plain = PreferenceLoss(policy, loss, BETA, reference="precomputed")(
                **batch, ref_logps=ref_logps
            )
        assert "nll_loss" not in plain
        nll = (metrics["nll_loss"] / n).item()
        assert 1.0 < nll < 20.0  # a random model over a 49K vocabulary: about log(49152) = 10.8 per token
        assert (theirs.item() - (dpo_sum / n).item()) / rpo_alpha == pytest.approx(nll, abs=LOSS_TOL[loss]["atol"])

    hf_params = dict(trainer.model.named_parameters())
    config = policy.config
    hf_names = _Layout(config)
    for name, param in policy.named_parameters():
        grad = param.grad
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            grad = permute_to_hf(grad, config.n_heads if ".wq." in name else config.kv_heads)
        theirs_grad = hf_params[hf_names.to_hf(name)].grad
        _assert_grad_close(grad, theirs_grad, f"{name} gradient")


def test_lora_reference_is_the_adapter_disabled_base_as_in_trl(tmp_path: Path, models: dict[str, Path]) -> None:
    peft = pytest.importorskip("peft")
    from llamaforge import load_tokenizer

    policy, _ = load_model(models["ref"], dtype=torch.float32)
    cfg = LoraConfig(r=4, alpha=8.0, dropout=0.0, targets="wq,wk,wv,wo,w1,w2,w3")
    apply_lora(policy, cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_modules(policy).values():  # a trained-looking adapter: B != 0
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.1)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    save_adapter(policy, tmp_path / "adapter", cfg, policy.config, layout="peft")
    # TRL's reference is the adapter-disabled base for an adapter it creates (a given trained adapter would get a
    # frozen copy as reference instead): let it create one, then give it our adapter's values
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_config = peft.LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=targets)
    trainer = _trl_trainer(tmp_path, models, "messages", "sigmoid", _hf(models["ref"]), None, peft_config)
    from safetensors.torch import load_file

    result = peft.set_peft_model_state_dict(
        trainer.model, load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    )
    assert not result.unexpected_keys
    pairs, _ = load_pairs(models["messages"], load_tokenizer(models["ref"]), 256, "chat")
    inputs = _same_tokens_and_batch(trainer, pairs)
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, inputs)
    theirs.backward()

    policy.train()
    loss_sum, n, metrics = PreferenceLoss(policy, "sigmoid", BETA, reference="adapter-off")(**collate_pairs(pairs, 0))
    ours = loss_sum / n
    ours.backward()
    torch.testing.assert_close(ours, theirs.detach(), **LOSS_TOL["sigmoid"])
    _check_metrics(trainer, metrics, n)
    assert abs(metrics["rewards/margins"].item()) > 1e-3  # the adapter changed the policy: a non-trivial check
    peft_params = dict(trainer.model.named_parameters())
    from llamaforge.train.lora import _hf_module_name

    for name, mod in lora_modules(policy).items():
        stem = f"base_model.model.{_hf_module_name(name)}"
        our_b = mod.lora_B.grad
        if name.endswith(("wq", "wk")):
            our_b = permute_to_hf(our_b, policy.config.n_heads if name.endswith("wq") else policy.config.kv_heads)
        a, b = peft_params[f"{stem}.lora_A.default.weight"].grad, peft_params[f"{stem}.lora_B.default.weight"].grad
        _assert_grad_close(mod.lora_A.grad, a, f"{name} lora_A gradient")
        _assert_grad_close(our_b, b, f"{name} lora_B gradient")
