"""Next-token loss without materializing the full logits.

The output projection and the cross-entropy are computed together, a chunk of tokens at a time: for each
chunk the logits are formed, reduced to the loss, and (when gradients are wanted) turned at once into the
gradients of the hidden states and of the output matrix. The [tokens, vocab] logits never exist in full, which
saves memory and, on CPU, most of the memory traffic of a 32K-vocabulary head. Targets equal to
``IGNORE_INDEX`` (-100) do not count (fine-tuning masks prompts that way).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
# Logits per chunk. On CPU a chunk's logits stay in the caches (32 MiB in float32: 256 tokens of a 32K vocabulary).
# On a GPU few large chunks win: each chunk adds its part of the output matrix's gradient into the float32 total,
# a pass over [vocab, dim] (1 GiB for Llama 3's 128K vocabulary), and small chunks make the matmuls thin. Measured
# on an H100 (16K tokens, 128K vocab, bf16): 144 ms with 256-token chunks, 62 ms with 4096-token ones.
_CHUNK_ELEMENTS_CPU = 1 << 23
_CHUNK_ELEMENTS_ACCELERATOR = 1 << 29


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def _softmax_grad(logits: Tensor, targets: Tensor, valid: Tensor | None, acc: torch.dtype, grad: bool,
                  probs_out: Tensor | None = None) -> tuple[Tensor | None, Tensor, Tensor]:  # fmt: skip
    """For one chunk of logits [n, V] and targets [n, 1]: each row's target logit and probability in ``acc``, and
    (when ``grad``) d(sum of losses)/d(logits) = softmax - onehot (zero on rows where ``valid`` is False) in the
    logits' dtype. The softmax is taken in ``acc`` (float32 for 16-bit logits) so that p - 1 keeps its precision
    for confident targets. Under torch.compile this is one fused pass; eagerly ``probs_out`` is a reused buffer."""
    if probs_out is None:
        probs = torch.softmax(logits, dim=-1, dtype=acc)
    else:
        probs = torch.softmax(logits, dim=-1, dtype=acc, out=probs_out)
    target_logit = logits.gather(1, targets).squeeze(1).to(acc)
    target_prob = probs.gather(1, targets).squeeze(1)
    if not grad:
        return None, target_logit, target_prob
    g = probs.scatter_add_(1, targets, probs.new_full(targets.shape, -1.0))
    if valid is not None:
        g = g.mul_(valid[:, None])
    return g.to(logits.dtype), target_logit, target_prob


@functools.cache
def _compiled_softmax_grad() -> Callable[..., tuple[Tensor | None, Tensor, Tensor]]:
    return torch.compile(_softmax_grad, dynamic=False)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, cdt: torch.dtype,
                compile: bool = False) -> Tensor:  # fmt: skip
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(cdt)
        acc = torch.promote_types(cdt, torch.float32)  # float32 for reduced precision, else as given
        n_rows, device = hidden.shape[0], hidden.device
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        valid = targets != IGNORE_INDEX
        all_valid = bool(valid.all())
        safe_targets = targets.masked_fill(~valid, 0)
        target_logit = torch.empty(n_rows, dtype=acc, device=device)
        target_prob = torch.empty(n_rows, dtype=acc, device=device)
        # One logits and one probabilities buffer serve every chunk: on CPU a fresh 32 MiB tensor is a fresh
        # mapping whose page faults, once per chunk, showed in profiles as a doubled softmax time.
        logits_buf = torch.empty(min(chunk, n_rows), weight.shape[0], dtype=cdt, device=device)
        probs_buf = None if compile else torch.empty(logits_buf.shape, dtype=acc, device=device)
        softmax_grad = _compiled_softmax_grad() if compile else _softmax_grad
        # CUDA's matmul can add a 16-bit product straight into a float32 total (no 16-bit partial, no extra pass)
        add_in_acc = want_w and device.type == "cuda" and cdt != acc
        for lo in range(0, n_rows, chunk):
            h = hidden[lo : lo + chunk].to(cdt)
            t = safe_targets[lo : lo + chunk, None]
            n = len(t)
            logits = torch.mm(h, w.t(), out=logits_buf[:n])
            g, target_logit[lo : lo + n], target_prob[lo : lo + n] = softmax_grad(
                logits,
                t,
                None if all_valid else valid[lo : lo + n],
                acc,
                want_h or want_w,
                None if probs_buf is None else probs_buf[:n],
            )
            if want_h:
                torch.mm(g, w, out=grad_h[lo : lo + n]) if hidden.dtype == cdt else grad_h[lo : lo + n].copy_(g @ w)
            if want_w:
                if add_in_acc:
                    torch.addmm(grad_w, g.t(), h, out_dtype=acc, out=grad_w)
                elif cdt == acc:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w.add_(g.t() @ h)
        losses = _token_losses(hidden, w, target_logit, target_prob, valid)
        ctx.save_for_backward(grad_h if want_h else None, grad_w if want_w else None)
        ctx.weight_dtype = weight.dtype
        return losses.masked_fill(~valid, 0.0).sum()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def _token_losses(hidden: Tensor, w: Tensor, target_logit: Tensor, target_prob: Tensor, valid: Tensor) -> Tensor:
    """-log p(target) per token from the softmax's value at the target (one pass over the logits, not
    log_softmax then exp). Where that probability is below the smallest normal float its log has lost
    precision; those rare rows take the exact logsumexp - logit instead."""
    losses = -target_prob.log()
    low = (target_prob < torch.finfo(target_prob.dtype).tiny) & valid
    if low.any():
        rows = low.nonzero().squeeze(1)
        logits = (hidden[rows].to(w.dtype) @ w.t()).to(losses.dtype)
        losses[rows] = torch.logsumexp(logits, dim=-1) - target_logit[rows]
    return losses


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int | None = None,
                         compile: bool = False) -> Tensor:  # fmt: skip
    """Sum over tokens of cross_entropy(hidden @ weight.T, targets), ignoring ``IGNORE_INDEX`` targets.

    ``hidden`` [N, D], ``weight`` [V, D], ``targets`` [N]. The sum is at least float32 whatever the compute dtype.
    ``compile`` fuses each chunk's softmax and gradient into one ``torch.compile``d pass over the logits.
    """
    device_type = hidden.device.type
    budget = _CHUNK_ELEMENTS_CPU if device_type == "cpu" else _CHUNK_ELEMENTS_ACCELERATOR
    chunk = chunk_tokens or max(256, budget // weight.shape[0])
    cdt = _compute_dtype(device_type, hidden.dtype)
    with torch.autocast(device_type, enabled=False):
        if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
            with torch.no_grad():
                return _LinearCrossEntropy.forward(_NoCtx(), hidden, weight, targets, chunk, cdt, compile)
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, cdt, compile)


class _NoCtx:
    needs_input_grad = (False,) * 6

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        pass


class CausalLMLoss(nn.Module):
    """Wraps a Transformer for training: ``forward(tokens, targets, attn_mask=None) -> (loss_sum, n_targets)``.

    Parallelism (DDP, FSDP2) is applied to this wrapper so that the output matrix is gathered while the loss
    reads it. ``fused=False`` computes full logits and ``F.cross_entropy`` (a reference for tests); ``compile``
    compiles the fused loss's per-chunk softmax (see ``linear_cross_entropy``).
    """

    def __init__(self, model: nn.Module, fused: bool = True, chunk_tokens: int | None = None,
                 compile: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.fused = fused
        self.chunk_tokens = chunk_tokens
        self.compile = compile

    def forward(self, tokens: Tensor, targets: Tensor, attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        count = (targets != IGNORE_INDEX).sum()
        if not self.fused:
            logits = self.model(tokens, attn_mask=attn_mask)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")  # fmt: skip
            return loss, count
        hidden = self.model(tokens, attn_mask=attn_mask, return_hidden=True)
        weight = self.model.output.weight
        loss = linear_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten(), self.chunk_tokens, self.compile)
        return loss, count
