"""Preference tuning: DPO, IPO and the reference-free SimPO, on full, LoRA and QLoRA fine-tuning.

Direct Preference Optimization (Rafailov et al. 2023) trains the policy so that its log-probability ratio to a
frozen reference model is higher on the chosen response than on the rejected one. With the summed response
log-probabilities ``pi_c, pi_r`` (policy) and ``ref_c, ref_r`` (reference)::

    sigmoid (DPO):  -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
    ipo (IPO):      ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r - 1 / (2 beta))^2   n = response tokens
    simpo (SimPO):  -log sigmoid(beta * (pi_c / n_c - pi_r / n_r) - gamma)           no reference model

as TRL computes them (IPO's per-token normalization included). ``finetune.rpo_alpha`` adds RPO's term (Pang et al.
2024, TRL's ``rpo_alpha``; in TRL 1.x ``loss_type=["sigmoid", "sft"]``): alpha times the negative log-likelihood of
the chosen responses, the mean over their tokens in the micro-batch: it holds the chosen answer up where DPO
alone may lower it together with the rejected one. The reported metrics are TRL's: the loss,
``rewards/chosen`` and ``rewards/rejected`` (beta times the log-ratio; SimPO: beta times the mean token
log-probability), ``rewards/margins``, ``rewards/accuracies`` (the share of pairs whose chosen reward is higher)
and ``logps/chosen``/``logps/rejected``; with RPO also ``nll_loss`` (that NLL, before alpha).

The reference costs no second copy of the model: with LoRA/QLoRA it is the base with the adapters switched off
(one extra forward without gradients per micro-batch); with full tuning its log-probabilities are computed once
before training, in one pass over the data, and cached to ``<out_dir>/reference_logps.safetensors`` (reused on
resume). ``finetune.dpo_reference: precompute`` does the same for LoRA.

Response log-probabilities come from the hidden states a chunk of tokens at a time, each chunk's logits
recomputed in backward, so the [tokens, vocab] logits never exist in full.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .loss import IGNORE_INDEX
from .preference import Pair, PairLoader, PairValidation, collate_pairs, load_pairs
from .records import split_by_index
from .sft import FinetuneRecipe, FinetuneTrainer, plan_steps, prepare_model

LOSSES = ("sigmoid", "ipo", "simpo")
REFERENCES = ("auto", "precompute", "adapter-off")
DEFAULT_BETA = {"sigmoid": 0.1, "ipo": 0.1, "simpo": 2.0}  # TRL's defaults (SimPO: its paper's range 2.0-2.5)
REFERENCE_CACHE = "reference_logps.safetensors"
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "nll_loss")  # fmt: skip
_CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MiB in float32), as the fused cross-entropy's CPU budget


# Log-probabilities --------------------------------------------------------------------------------------------
def _chunk_logps(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # 16-bit logits: softmax in float32
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(model: nn.Module, tokens: Tensor, targets: Tensor,
                   chunk_tokens: int | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per row of ``tokens`` [N, T]: the sum of log p(target) over the targets that are not ``IGNORE_INDEX``
    (float32, or float64 for a float64 model), and how many there are. Only those positions go through the
    output head, a chunk at a time."""
    hidden = model(tokens, return_hidden=True)
    valid = targets != IGNORE_INDEX
    rows, cols = valid.nonzero(as_tuple=True)
    h, t = hidden[rows, cols], targets[rows, cols]
    head = model.output
    chunk = chunk_tokens or max(64, _CHUNK_ELEMENTS // model.config.vocab_size)
    grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    for lo in range(0, len(t), chunk):
        args = (head, h[lo : lo + chunk], t[lo : lo + chunk])
        parts.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if grad else _chunk_logps(*args))
    dtype = torch.promote_types(h.dtype, torch.float32)
    token_logps = torch.cat(parts) if parts else h.new_zeros(0, dtype=dtype)
    sums = torch.zeros(len(tokens), dtype=token_logps.dtype, device=tokens.device).index_add(0, rows, token_logps)
    return sums, valid.sum(1)


# Losses ---------------------------------------------------------------------------------------------------------
def chosen_nll(chosen: Tensor, n_chosen: Tensor, weights: Tensor) -> Tensor:
    """RPO's NLL term: the mean negative log-probability over the chosen responses' tokens of the pairs with a
    non-zero weight (one mean over the micro-batch's tokens, as TRL computes it, not a mean of per-pair means)."""
    tokens = (n_chosen.to(chosen.dtype) * weights).sum().clamp(min=1)
    return -(chosen * weights).sum() / tokens


def preference_losses(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor | None, ref_rejected: Tensor | None, *,
                      n_chosen: Tensor, n_rejected: Tensor, loss: str = "sigmoid", beta: float = 0.1,
                      gamma: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Per-pair losses and the chosen/rejected rewards (detached) from summed response log-probabilities."""
    if loss == "simpo":
        avg_c, avg_r = chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1)
        losses = -F.logsigmoid(beta * (avg_c - avg_r) - gamma)
        return losses, beta * avg_c.detach(), beta * avg_r.detach()
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"the {loss} loss needs the reference model's log-probabilities")
    ratio_c, ratio_r = chosen - ref_chosen, rejected - ref_rejected
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * (ratio_c - ratio_r))
    elif loss == "ipo":
        delta = ratio_c / n_chosen.clamp(min=1) - ratio_r / n_rejected.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss!r}: choose one of {', '.join(LOSSES)}")
    return losses, beta * ratio_c.detach(), beta * ratio_r.detach()


class PreferenceLoss(nn.Module):
    """Wraps a Transformer for ``Trainer``: ``forward(tokens, targets, weights, ref_logps=None)`` on a batch of
    ``preference.collate_pairs`` -> (sum of the pairs' losses, number of pairs, {metric: sum over pairs}).
    ``rpo_alpha`` (not None) adds alpha x ``chosen_nll`` to each pair's loss and logs ``nll_loss``.

    ``reference``: "precomputed" (the batch carries ``ref_logps``), "adapter-off" (the model with its LoRA
    adapters switched off, without gradients) or "none" (SimPO)."""

    def __init__(self, model: nn.Module, loss: str = "sigmoid", beta: float = 0.1, gamma: float = 0.5,
                 reference: str = "precomputed", chunk_tokens: int | None = None,
                 rpo_alpha: float | None = None) -> None:  # fmt: skip
        super().__init__()
        self.model, self.loss, self.beta, self.gamma, self.rpo_alpha = model, loss, beta, gamma, rpo_alpha
        self.reference, self.chunk_tokens = reference, chunk_tokens

    def forward(self, tokens: Tensor, targets: Tensor, weights: Tensor,
                ref_logps: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:  # fmt: skip
        from .lora import adapters_disabled

        logps, counts = sequence_logps(self.model, tokens, targets, self.chunk_tokens)
        if self.reference == "adapter-off":
            with torch.no_grad(), adapters_disabled(self.model):
                ref_logps, _ = sequence_logps(self.model, tokens, targets, self.chunk_tokens)
        elif self.reference == "precomputed" and ref_logps is None:
            raise ValueError("the batch has no precomputed reference log-probabilities (ref_logps)")
        chosen, rejected = logps.chunk(2)
        n_chosen, n_rejected = counts.chunk(2)
        ref_c, ref_r = (None, None) if ref_logps is None or self.loss == "simpo" else ref_logps.to(logps).chunk(2)
        losses, reward_c, reward_r = preference_losses(chosen, rejected, ref_c, ref_r, n_chosen=n_chosen,
                                                       n_rejected=n_rejected, loss=self.loss, beta=self.beta,
                                                       gamma=self.gamma)  # fmt: skip
        w = weights.to(losses.dtype)
        extra: dict[str, Tensor] = {}
        if self.rpo_alpha is not None:  # the batch's token mean, added to every pair: the pairs' mean gets it once
            nll = chosen_nll(chosen, n_chosen, w)
            losses = losses + self.rpo_alpha * nll
            extra["nll_loss"] = nll.detach().expand_as(losses)
        if self.loss == "simpo":  # TRL's CPO/SimPO trainer logs mean token log-probabilities
            chosen, rejected = chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1)
        per_pair = {"rewards/chosen": reward_c, "rewards/rejected": reward_r, "rewards/margins": reward_c - reward_r,
                    "rewards/accuracies": (reward_c > reward_r).float(), "logps/chosen": chosen.detach(),
                    "logps/rejected": rejected.detach(), **extra}  # fmt: skip
        metrics = {k: (v * w).sum() for k, v in per_pair.items()}
        return (losses * w).sum(), w.sum(), metrics


# The reference, precomputed ------------------------------------------------------------------------------------
def _fingerprint(model: nn.Module, pairs: Sequence[Pair], what: str) -> str:
    """A digest of the reference's weights (adapters excluded: they are off) and of every pair's tokens."""
    digest = hashlib.blake2b(what.encode(), digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if name.endswith((".lora_A", ".lora_B")):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    for p in pairs:
        for seq in (p.prompt, p.chosen, p.rejected, p.chosen_mask, p.rejected_mask):
            digest.update(repr(seq).encode())
    return digest.hexdigest()


@torch.no_grad()
def precompute_reference(model: nn.Module, pairs: Sequence[Pair], batch_size: int, pad_id: int, *,
                         device: torch.device, autocast: Any = None, cache: str | os.PathLike | None = None,
                         write: bool = True, progress: bool = True) -> str:  # fmt: skip
    """Fill ``ref_chosen``/``ref_rejected`` of every pair with the model's response log-probabilities (its LoRA
    adapters off, if it has any), in one pass; read them from ``cache`` instead when it holds this model's
    values for these pairs, and write them there otherwise (``write``). Returns "cached" or "computed"."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file, save_file

    from ..checkpoint import atomic_output
    from .lora import adapters_disabled, lora_modules

    key = _fingerprint(model, pairs, "reference log-probabilities v1")
    path = Path(cache) if cache is not None else None
    if path is not None and path.exists():
        try:
            with safe_open(str(path), "pt") as f:
                same = (f.metadata() or {}).get("key") == key
        except (SafetensorError, OSError) as exc:  # not a cache this code wrote: compute again, replace it
            warnings.warn(f"{path}: unreadable reference cache ({exc}); computing the reference again", stacklevel=2)
            same = False
        if same:
            values = load_file(str(path))
            for p, c, r in zip(pairs, values["chosen"].tolist(), values["rejected"].tolist()):
                p.ref_chosen, p.ref_rejected = c, r
            return "cached"
    was_training = model.training
    model.eval()
    off = adapters_disabled(model) if lora_modules(model) else contextlib.nullcontext()
    batches = range(0, len(pairs), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="reference log-probabilities", unit=" batches", leave=False)
    try:
        with off:
            for lo in batches:
                group = pairs[lo : lo + batch_size]
                batch = collate_pairs(group, pad_id, device)
                with autocast or contextlib.nullcontext():
                    logps, _ = sequence_logps(model, batch["tokens"], batch["targets"])
                chosen, rejected = logps.double().cpu().chunk(2)
                for p, c, r in zip(group, chosen.tolist(), rejected.tolist()):
                    p.ref_chosen, p.ref_rejected = c, r
    finally:
        model.train(was_training)
    if path is not None and write:
        tensors = {"chosen": torch.tensor([p.ref_chosen for p in pairs], dtype=torch.float64),
                   "rejected": torch.tensor([p.ref_rejected for p in pairs], dtype=torch.float64)}  # fmt: skip
        with atomic_output(path, is_dir=False) as tmp:
            save_file(tensors, str(tmp), metadata={"key": key, "pairs": str(len(pairs))})
    return "computed"


# The run ---------------------------------------------------------------------------------------------------------
def resolve_reference(recipe: FinetuneRecipe) -> str:
    """What serves as the reference: "none" (SimPO), "adapter-off" or "precomputed"."""
    f = recipe.finetune
    if f.dpo_loss == "simpo":
        return "none"
    if f.dpo_reference == "adapter-off" or (f.dpo_reference == "auto" and f.method != "full"):
        return "adapter-off"
    return "precomputed"


def dpo_beta(recipe: FinetuneRecipe) -> float:
    f = recipe.finetune
    return f.dpo_beta if f.dpo_beta is not None else DEFAULT_BETA[f.dpo_loss]


class PreferenceTrainer(FinetuneTrainer):
    """The fine-tuning Trainer with a preference loss: batches of pairs, the step's loss the mean over pairs."""

    console_metrics = ("rewards/accuracies", "rewards/margins", "nll_loss")

    def __init__(self, recipe: FinetuneRecipe, *, reference: str, **kwargs: Any) -> None:
        super().__init__(recipe, **kwargs)
        self.reference = reference

    def _loss_module(self, model: nn.Module, device: torch.device) -> nn.Module:
        f = self.recipe.finetune  # type: ignore[attr-defined]
        return PreferenceLoss(model, f.dpo_loss, dpo_beta(self.recipe), f.simpo_gamma, self.reference,
                              rpo_alpha=f.rpo_alpha)  # fmt: skip

    def _loss_units(self, batch: dict[str, Tensor]) -> int:
        return int(batch["weights"].sum())


def finetune_dpo(recipe: FinetuneRecipe, *, llm: Any = None, callbacks: Sequence[Any] = (),
                 progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Preference-tune ``recipe.model.from_checkpoint`` on the pairs of ``recipe.finetune.data``; returns the
    run's summary (``finetune`` calls this when ``finetune.objective`` is dpo)."""
    from .sft import start_process

    f, d, t = recipe.finetune, recipe.data, recipe.train
    rank, data_rank, data_world, device, llm, say = start_process(recipe, llm)
    tokenizer = llm.tokenizer

    pairs, report = load_pairs(f.data, tokenizer, d.seq_len, f.template, f.system_prompt,
                               progress=progress and rank == 0)  # fmt: skip
    if f.val_data:
        train_pairs = pairs
        val_pairs, val_report = load_pairs(f.val_data, tokenizer, d.seq_len, f.template, f.system_prompt)
    else:
        train_pairs, val_pairs = split_by_index(pairs, f.val_fraction, t.seed)
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    loader = PairLoader(train_pairs, d.micro_batch_size, d.grad_accum_steps, rank=data_rank, world_size=data_world,
                        seed=t.seed, pad_id=pad_id, device=device)  # fmt: skip
    say(plan_steps(recipe, loader.steps_per_epoch))
    if report.n_skipped and rank == 0:
        warnings.warn(report.summary(noun="pairs"), stacklevel=2)  # skipped records are reported, the run goes on
    else:
        say(report.summary(noun="pairs"))
    if f.val_data:
        say(val_report.summary(noun="pairs"))
    val = PairValidation(val_pairs, d.micro_batch_size, rank=data_rank, world_size=data_world, pad_id=pad_id,
                         device=device) if val_pairs else None  # fmt: skip
    counts = prepare_model(llm.model, recipe)
    reference = resolve_reference(recipe)
    trainer = PreferenceTrainer(recipe, reference=reference, model=llm.model, train_data=loader, val_data=val,
                                tokenizer=tokenizer, callbacks=callbacks,
                                base_model=str(recipe.model.from_checkpoint))  # fmt: skip
    n_tokens = sum(p.n_tokens for p in train_pairs)
    rpo = f" + rpo_alpha {f.rpo_alpha:g} x NLL of chosen" if f.rpo_alpha is not None else ""
    say(f"{len(train_pairs)} training pairs ({n_tokens:,} tokens), {len(val_pairs)} validation; "
        f"{loader.steps_per_epoch:.1f} steps per epoch; {f.dpo_loss} loss, beta {dpo_beta(recipe):g}{rpo}, reference "
        f"{reference}; method {f.method}: {counts['trainable']:,} of {counts['total']:,} parameters train")  # fmt: skip
    cache_state = None
    if reference == "precomputed":
        llm.model.to(device)
        cache = Path(t.out_dir) / REFERENCE_CACHE
        cache_state = precompute_reference(llm.model, [*train_pairs, *val_pairs], 2 * d.micro_batch_size, pad_id,
                                           device=device, autocast=trainer._autocast(device), cache=cache,
                                           write=t.save and rank == 0, progress=progress and rank == 0)  # fmt: skip
        say(f"reference log-probabilities {cache_state}" + (f" ({cache})" if t.save else ""))
    summary = trainer.fit()
    last = trainer.history[-1] if trainer.history else {}
    summary.update(method=f.method, objective="dpo", loss_type=f.dpo_loss, beta=dpo_beta(recipe),
                   rpo_alpha=f.rpo_alpha, reference=reference,
                   reference_cache=cache_state, examples=len(train_pairs), val_examples=len(val_pairs),
                   skipped_examples=report.n_skipped, trainable_params=counts["trainable"],
                   epochs=loader.step / max(loader.steps_per_epoch, 1e-9),
                   **{k: last[k] for k in METRICS if k in last})  # fmt: skip
    if trainer.val_history:
        summary.update({k: v for k, v in trainer.val_history[-1].items() if k.startswith("val_")})
    summary["history"] = trainer.history
    summary["val_history"] = trainer.val_history
    return summary


__all__ = ["LOSSES", "PairLoader", "PreferenceLoss", "PreferenceTrainer", "chosen_nll", "finetune_dpo",
           "precompute_reference", "preference_losses", "sequence_logps"]  # fmt: skip
