"""AdamW parameter groups, the warm-up + cosine schedule, and the chunked output/cross-entropy."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from llamaforge.config import get_preset
from llamaforge.model import build_model
from llamaforge.train.loss import CausalLMLoss, linear_cross_entropy
from llamaforge.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def test_weight_decay_on_matrices_only() -> None:
    model = build_model(get_preset("tiny"))
    model.layers[0].attention.wq.weight.requires_grad_(False)  # frozen: not optimized at all
    opt = build_optimizer(model, lr=1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.95)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 for p in decay["params"])
    assert {names[id(p)].rsplit(".", 2)[-2] for p in no_decay["params"]} == {"attention_norm", "ffn_norm", "norm"}
    assert id(model.layers[0].attention.wq.weight) not in {id(p) for g in opt.param_groups for p in g["params"]}
    tied = build_model(get_preset("stories15m", n_layers=1, vocab_size=64))
    groups = param_groups(tied.named_parameters(), 0.1)
    assert sum(len(g["params"]) for g in groups) == len({id(p) for p in tied.parameters()})
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, lr=1e-3)


def test_schedule_warmup_cosine_to_ten_percent() -> None:
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.1)
    assert lr_factor(500, 10, 100) == pytest.approx(0.1)
    mid = [lr_factor(s, 10, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(mid))  # monotone decay
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    sched = build_scheduler(opt, 4, 20)
    lrs = []
    for _ in range(21):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(3e-4 / 4) and lrs[3] == pytest.approx(3e-4) and lrs[20] == pytest.approx(3e-5)


@pytest.mark.parametrize("chunk", [5, 64, None])
def test_linear_cross_entropy_matches_reference(chunk: int | None) -> None:
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    t[[3, 10, 11]] = -100
    loss = linear_cross_entropy(h, w, t, chunk)
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-100, reduction="sum")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    gh, gw = torch.autograd.grad(loss * 0.5, (h, w))
    rh, rw = torch.autograd.grad(ref * 0.5, (h, w))
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)
    with torch.no_grad():
        assert linear_cross_entropy(h, w, t, chunk).item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("ignored", [False, True])
def test_linear_cross_entropy_float32_gradients(ignored: bool) -> None:
    """float32 (the CPU training dtype), chunks of 7 over 40 tokens (a remainder of 5), against F.linear +
    F.cross_entropy; with every target valid the ignored-row masking is skipped."""
    torch.manual_seed(1)
    h = torch.randn(40, 24, requires_grad=True)
    w = torch.randn(90, 24, requires_grad=True)
    t = torch.randint(0, 90, (40,))
    if ignored:
        t[[0, 6, 7, 39]] = -100
    loss = linear_cross_entropy(h, w, t, chunk_tokens=7)
    ref = F.cross_entropy(F.linear(h, w), t, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss, ref)
    got = torch.autograd.grad(loss / 3, (h, w))
    want = torch.autograd.grad(ref / 3, (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_linear_cross_entropy_bfloat16_autocast() -> None:
    """Under CPU autocast the logits are bfloat16 products and the softmax and sums float32."""
    torch.manual_seed(3)
    h = torch.randn(19, 16, requires_grad=True)
    w = torch.randn(70, 16, requires_grad=True)
    t = torch.randint(0, 70, (19,))
    t[4] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk_tokens=6)
    ref = F.cross_entropy(F.linear(h.bfloat16(), w.bfloat16()).float(), t, ignore_index=-100, reduction="sum")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)
    got = torch.autograd.grad(loss, (h, w))
    want = torch.autograd.grad(ref, (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_linear_cross_entropy_target_probability_underflow() -> None:
    """Targets whose softmax probability underflows float32 (loss > 87) take the exact logsumexp path."""
    torch.manual_seed(2)
    h = (torch.randn(12, 8) * 40).requires_grad_()
    w = torch.randn(30, 8, requires_grad=True)
    t = F.linear(h, w).argmin(-1)  # the least likely token: a loss of hundreds of nats
    t[5] = -100
    loss = linear_cross_entropy(h, w, t, chunk_tokens=5)
    ref = F.cross_entropy(F.linear(h.double(), w.double()), t, ignore_index=-100, reduction="sum")
    assert ref.item() / 11 > 150 and torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), ref)
    got = torch.autograd.grad(loss, (h, w))
    want = torch.autograd.grad(F.cross_entropy(F.linear(h, w), t, ignore_index=-100, reduction="sum"), (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_causal_lm_loss_fused_equals_logits_path() -> None:
    torch.manual_seed(0)
    model = build_model(get_preset("stories15m", n_layers=1, vocab_size=300))  # tied embeddings
    tokens = torch.randint(0, 300, (2, 17))
    targets = torch.roll(tokens, -1, 1)
    targets[1, :4] = -100
    results = []
    for fused in (True, False):
        model.zero_grad()
        loss, count = CausalLMLoss(model, fused=fused)(tokens, targets)
        (loss / count).backward()
        results.append((loss.item(), count.item(), [p.grad.clone() for p in model.parameters()]))
    assert results[0][1] == results[1][1] == 30
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert math.isfinite(results[0][0])
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_linear_cross_entropy_compiled_softmax() -> None:
    """``compile=True`` runs each chunk's softmax and gradient through torch.compile: the same loss and gradients
    as the reference, with ignored targets and a short last chunk (32 tokens in chunks of 12)."""
    torch.manual_seed(4)
    h = torch.randn(32, 16, requires_grad=True)
    w = torch.randn(60, 16, requires_grad=True)
    t = torch.randint(0, 60, (32,))
    t[[2, 30]] = -100
    loss = linear_cross_entropy(h, w, t, chunk_tokens=12, compile=True)
    ref = F.cross_entropy(F.linear(h, w), t, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss, ref)
    got = torch.autograd.grad(loss, (h, w))
    want = torch.autograd.grad(ref, (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile", [False, True])
def test_linear_cross_entropy_cuda_bfloat16(compile: bool) -> None:
    """On CUDA under bf16 autocast, the output-matrix gradient summed in float32 straight from the bf16 products
    (three chunks), against float32 math on the same bf16-rounded inputs."""
    torch.manual_seed(5)
    h = torch.randn(3000, 64, device="cuda").bfloat16().requires_grad_()
    w = torch.randn(5000, 64, device="cuda").mul(0.1).requires_grad_()
    t = torch.randint(0, 5000, (3000,), device="cuda")
    t[::7] = -100
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk_tokens=1024, compile=compile)
    gh, gw = torch.autograd.grad(loss, (h, w))
    hr, wr = h.detach().float().requires_grad_(), w.detach().bfloat16().float().requires_grad_()
    ref = F.cross_entropy(hr @ wr.t(), t, ignore_index=-100, reduction="sum")
    rh, rw = torch.autograd.grad(ref, (hr, wr))
    err_h = ((gh.float() - rh).norm() / rh.norm()).item()
    err_w = ((gw - rw).norm() / rw.norm()).item()
    # bf16-level errors (the softmax gradient itself is bf16): on an H100, 2.7e-4 for the output matrix
    assert (loss.item(), err_h, err_w) == (pytest.approx(ref.item(), rel=1e-4), pytest.approx(0, abs=1e-2),
                                           pytest.approx(0, abs=5e-4))  # fmt: skip
