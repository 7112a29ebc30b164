"""Next-token loss without materializing the full logits.

The output projection and the cross-entropy are computed together, a chunk of tokens at a time: for each
chunk the logits are formed, reduced to the loss, and (when gradients are wanted) turned at once into the
gradients of the hidden states and of the output matrix. The [tokens, vocab] logits never exist in full, which
saves memory and, on CPU, most of the memory traffic of a 32K-vocabulary head. Targets equal to
``IGNORE_INDEX`` (-100) do not count (fine-tuning masks prompts that way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MiB in float32; 256 tokens of a 32K vocabulary)


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, cdt: torch.dtype) -> Tensor:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(cdt)
        acc = torch.promote_types(cdt, torch.float32)  # float32 for reduced precision, else as given
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        all_valid = bool((targets != IGNORE_INDEX).all())
        for lo in range(0, hidden.shape[0], chunk):
            h = hidden[lo : lo + chunk].to(cdt)
            t = targets[lo : lo + chunk]
            valid = t != IGNORE_INDEX
            safe_t = t if all_valid else t.masked_fill(~valid, 0)
            logp = torch.log_softmax(torch.mm(h, w.t()).to(acc), dim=-1)
            picked = logp.gather(1, safe_t[:, None]).squeeze(1)
            total -= picked.sum() if all_valid else (picked * valid).sum()
            if want_h or want_w:
                # d(sum of losses)/d(logits) = softmax - onehot, zero on ignored rows; reuses logp's memory
                g = logp.exp_()
                g[torch.arange(len(t), device=t.device), safe_t] -= 1.0
                if not all_valid:
                    g.mul_(valid[:, None])
                g = g.to(cdt)
                if want_h:
                    torch.mm(g, w, out=grad_h[lo : lo + chunk]) if hidden.dtype == cdt else \
                        grad_h[lo : lo + chunk].copy_(g @ w)  # fmt: skip
                if want_w:
                    if cdt == acc:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w.add_(g.t() @ h)
        ctx.save_for_backward(grad_h if want_h else None, grad_w if want_w else None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int | None = None) -> Tensor:
    """Sum over tokens of cross_entropy(hidden @ weight.T, targets), ignoring ``IGNORE_INDEX`` targets.

    ``hidden`` [N, D], ``weight`` [V, D], ``targets`` [N]. The sum is at least float32 whatever the compute dtype.
    """
    chunk = chunk_tokens or max(256, _CHUNK_ELEMENTS // weight.shape[0])
    cdt = _compute_dtype(hidden.device.type, hidden.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
            with torch.no_grad():
                return _LinearCrossEntropy.forward(_NoCtx(), hidden, weight, targets, chunk, cdt)
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, cdt)


class _NoCtx:
    needs_input_grad = (False, False, False, False, False)

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        pass


class CausalLMLoss(nn.Module):
    """Wraps a Transformer for training: ``forward(tokens, targets, attn_mask=None) -> (loss_sum, n_targets)``.

    Parallelism (DDP, FSDP2) is applied to this wrapper so that the output matrix is gathered while the loss
    reads it. ``fused=False`` computes full logits and ``F.cross_entropy`` (a reference for tests).
    """

    def __init__(self, model: nn.Module, fused: bool = True, chunk_tokens: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.fused = fused
        self.chunk_tokens = chunk_tokens

    def forward(self, tokens: Tensor, targets: Tensor, attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        count = (targets != IGNORE_INDEX).sum()
        if not self.fused:
            logits = self.model(tokens, attn_mask=attn_mask)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")  # fmt: skip
            return loss, count
        hidden = self.model(tokens, attn_mask=attn_mask, return_hidden=True)
        weight = self.model.output.weight
        return linear_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten(), self.chunk_tokens), count
