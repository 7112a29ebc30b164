"""The LLaMA paper's optimizer: AdamW (β1 0.9, β2 0.95, weight decay 0.1 on matrices only) with a linear
warm-up followed by a cosine decay to a fraction (10%) of the peak learning rate."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group (matrices, embeddings included) and an undecayed one
    (norm gains, biases: anything with fewer than two dimensions). Frozen parameters are left out, so a
    fine-tuning run that freezes the base model optimizes only what it trains."""
    decay, no_decay, seen = [], [], set()
    for _, p in named_params:
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    weight_decay: float = 0.1, fused: bool | None = None) -> torch.optim.AdamW:  # fmt: skip
    """AdamW over the model's trainable parameters. ``fused=None`` uses the fused kernel where it exists for
    the parameters' device and is not sharded (DTensor parameters take the foreach path)."""
    groups = param_groups(model.named_parameters(), weight_decay)
    if fused is None:
        first = groups[0]["params"][0]
        is_dtensor = type(first).__name__ == "DTensor"
        fused = not is_dtensor and first.device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def lr_factor(step: int, warmup_steps: int, decay_steps: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Linear warm-up from peak/warmup_steps to the peak over ``warmup_steps`` steps, then cosine decay to
    ``min_ratio`` x peak at ``decay_steps``, constant afterwards.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (decay_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, decay_steps: int,
                    min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:  # fmt: skip
    """A LambdaLR whose state (the step count) is saved with the checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, decay_steps, min_ratio)
    )
