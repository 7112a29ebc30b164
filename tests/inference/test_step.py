"""The inference step (llamaforge/inference/step.py): FastForward gives the same logits and greedy tokens as the
plain model with the weights unchanged; select_step picks, names and logs one step per engine."""

from __future__ import annotations

import logging

import pytest
import torch

from llamaforge import kernels
from llamaforge.config import get_preset
from llamaforge.fast import fuse_linears
from llamaforge.inference.cache import PagedKVCache
from llamaforge.inference.step import FastForward, select_step
from llamaforge.model import build_model
from llamaforge.quantize import BlockInt8Linear, Int4Linear, Int8Linear, fuse_quantized, quantize_model


def _model(preset: str = "tiny", dtype: torch.dtype | None = None, scheme: str | None = None):
    torch.manual_seed(0)
    model = build_model(get_preset(preset), dtype=dtype).eval()
    if scheme:
        quantize_model(model, scheme)
    return model


@torch.inference_mode()
def _run(fn, model, prompt: torch.Tensor, steps: int, scatter: bool = False):
    """Prefill `prompt` [B, T] then decode greedily through a fresh paged cache; returns (all logits, tokens).
    `scatter`: the sequences' blocks interleave in the pool (each table jumps around)."""
    B, T = prompt.shape
    cache = PagedKVCache.for_model(model, 4 * 128, block_size=4)
    seqs = [cache.sequence(64) for _ in range(B)]
    if scatter:  # take blocks round-robin, in reverse order of the sequences
        for n in range(1, 17):
            for seq in reversed(seqs):
                cache.ensure(seq, 4 * n)
    pos = torch.arange(T).expand(B, T)
    logits = [fn(prompt, pos, cache=cache.prepare(seqs, pos))[:, -1].float()]
    tokens = [logits[-1].argmax(-1)]
    for i in range(steps):
        pos = torch.full((B, 1), T + i)
        logits.append(fn(tokens[-1][:, None], pos, cache=cache.prepare(seqs, pos))[:, -1].float())
        tokens.append(logits[-1].argmax(-1))
    return torch.stack(logits), torch.stack(tokens)


@pytest.mark.parametrize("preset", ["tiny", "tiny-mha"])
def test_float32_matches_model(preset):
    model = _model(preset)
    prompt = torch.randint(0, 512, (2, 9))
    ref_logits, ref_tokens = _run(model, model, prompt, 12)
    logits, tokens = _run(FastForward(model), model, prompt, 12)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, ref_tokens)


def test_scattered_block_tables():
    model = _model()
    prompt = torch.randint(0, 512, (2, 7))
    ref_logits, ref_tokens = _run(model, model, prompt, 5)
    logits, tokens = _run(FastForward(model), model, prompt, 5, scatter=True)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, ref_tokens)


def test_weights_and_state_dict_unchanged():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = FastForward(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    # The projections use the model's own weights: no second copy (a checkpoint is often memory-mapped).
    att = model.layers[0].attention
    parts = fast.layers[0].qkv.parts
    assert [p.weight.data_ptr() for p in parts] == [w.weight.data_ptr() for w in (att.wq, att.wk, att.wv)]


def test_stale_after_cast():
    model = _model()
    first = select_step(model)
    assert first.is_current(model)
    model.to(torch.bfloat16)
    assert not first.is_current(model)
    second = select_step(model).fast
    assert second.is_current()
    prompt = torch.randint(0, 512, (1, 6))
    torch.testing.assert_close(_run(second, model, prompt, 3)[0], _run(model, model, prompt, 3)[0], atol=0.1, rtol=0.05)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_matches_model(scheme):
    model = _model(scheme=scheme)
    prompt = torch.randint(0, 512, (1, 40))  # >= PREFILL_ROWS rows: the dequantized path too
    ref_logits, ref_tokens = _run(model, model, prompt, 8)
    logits, tokens = _run(FastForward(model), model, prompt, 8)
    # The kernels round activations to bfloat16, so a different attention summation order can flip
    # the last bit of a bfloat16 input: compare loosely, and the greedy tokens exactly.
    torch.testing.assert_close(logits, ref_logits, atol=0.05, rtol=0.02)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
def test_native_and_torch_paths_match_model(native, scheme, monkeypatch):
    """Greedy tokens equal model(...)'s with the native decode step (when built) and with torch's kernels."""
    model = _model(scheme=scheme)
    prompt = torch.randint(0, 512, (2, 9))
    ref_logits, ref_tokens = _run(model, model, prompt, 10)
    calls = []
    step = kernels.decode_step
    monkeypatch.setattr(kernels, "decode_step", lambda *a: calls.append(1) or step(*a))
    if native:
        logits, tokens = _run(FastForward(model), model, prompt, 10)
    else:
        with kernels.disabled():
            logits, tokens = _run(FastForward(model), model, prompt, 10)
    assert len(calls) == (10 if native else 0)  # one decode_step per token on the native path
    tol = 1e-4 if scheme is None else 0.05  # torch's quantized kernels round activations to bfloat16
    torch.testing.assert_close(logits, ref_logits, atol=tol, rtol=tol)
    assert torch.equal(tokens, ref_tokens)


def test_fuse_quantized_is_exact():
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    ws = [torch.randn(n, 64) * 0.1 for n in (32, 16, 48)]
    for make in (Int8Linear.from_float, lambda w: Int4Linear.from_float(w, 32)):
        mods = [make(w) for w in ws]
        fused = fuse_quantized(mods)
        assert torch.equal(fused(x), torch.cat([m(x) for m in mods], -1))
    blocks = [BlockInt8Linear.from_blocks(torch.randint(-127, 127, (n, 64), dtype=torch.int8),
                                          torch.rand(n, 2)) for n in (32, 16)]  # fmt: skip
    fused = fuse_quantized(blocks)
    torch.testing.assert_close(fused(x), torch.cat([m(x) for m in blocks], -1), atol=0, rtol=0)
    with pytest.raises(ValueError, match="one kind"):
        fuse_quantized([Int8Linear.from_float(ws[0]), Int4Linear.from_float(ws[1], 32)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_close(dtype):
    model = _model(dtype=dtype)
    prompt = torch.randint(0, 512, (1, 6))
    ref = _run(model, model, prompt, 6)[0]
    got = _run(FastForward(model), model, prompt, 6)[0]
    # float32 products (weights converted a chunk at a time), outputs rounded to the model's dtype.
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0.02)


def test_fuse_linears_mixed_kinds_concatenate():
    lin = torch.nn.Linear(64, 32, bias=False)
    q = Int8Linear.from_float(torch.randn(16, 64))
    x = torch.randn(2, 64)
    out = fuse_linears([lin, q])(x)
    torch.testing.assert_close(out, torch.cat([lin(x), q(x)], -1))


def test_unsupported_models_fall_back_to_the_model():
    model = _model("tiny-moe")
    step = select_step(model)
    assert step.name == "eager" and step.forward is model and "mixture-of-experts" in step.detail
    with pytest.raises(ValueError, match="mixture-of-experts"):
        FastForward(model)


def test_step_selection_is_named_and_logged(caplog):
    model = _model()
    with caplog.at_level(logging.INFO, logger="llamaforge.inference"):
        step = select_step(model)
    assert step.name == "native" and isinstance(step.forward, FastForward)
    assert "inference step = native" in caplog.text
    with kernels.disabled():
        assert select_step(model).name == "eager"
    assert select_step(model, compile=True).name == "compiled"


def test_native_step_takes_several_rows_per_sequence(monkeypatch):
    """A short chunk (draft verification, a prompt's tail after a prefix hit) runs as one native op: rows of one
    sequence at consecutive positions attend to each other causally."""
    model = _model()
    prompt = torch.randint(0, 512, (2, 5))
    calls = []
    step = kernels.decode_step
    monkeypatch.setattr(kernels, "decode_step", lambda *a: calls.append(a[0].shape[0]) or step(*a))
    logits, _ = _run(FastForward(model), model, prompt, 2)
    ref, _ = _run(model, model, prompt, 2)
    assert calls == [10, 2, 2]
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compiled_step_matches():
    model = _model()
    prompt = torch.randint(0, 512, (1, 5))
    ref_logits, ref_tokens = _run(model, model, prompt, 4)
    logits, tokens = _run(select_step(model, compile=True).forward, model, prompt, 4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, ref_tokens)


# Per layer, the types of wq, wk, wv, wo, w1, w3, w2: q, k and v (and w1, w3) of different types and activation
# kinds (per 256 columns for K-quants, per 32 with and without Q8_1 sums) run as one multi-part projection.
MIXED_GGUF = [("Q4_K", "Q4_1", "Q6_K", "Q8_0", "Q5_K", "Q4_0", "Q6_K"),
              ("Q8_0", "Q8_0", "Q4_K", "Q5_1", "Q5_0", "Q3_K", "Q2_K")]  # fmt: skip


def test_mixed_gguf_projections_match_model():
    from gguf import GGMLQuantizationType

    from llamaforge.quantize import GGUFLinear

    torch.manual_seed(0)
    model = build_model(get_preset("tiny", dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2)).eval()
    for layer, types in zip(model.layers, MIXED_GGUF):
        att, ffn = layer.attention, layer.feed_forward
        for owner, name, qtype in zip([att] * 4 + [ffn] * 3, ["wq", "wk", "wv", "wo", "w1", "w3", "w2"], types):
            setattr(owner, name, GGUFLinear.from_float(getattr(owner, name).weight, GGMLQuantizationType[qtype]))
    prompt = torch.randint(0, 512, (2, 9))
    ref_logits, ref_tokens = _run(model, model, prompt, 10)  # every linear alone (kernels.linear)
    fast = FastForward(model)
    assert fast.native
    logits, tokens = _run(fast, model, prompt, 10)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, ref_tokens)
