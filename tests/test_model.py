"""The model's math against straightforward re-derivations, and the KV cache against full forwards."""

import math

import pytest
import torch
import torch.nn.functional as F

from llamaforge.config import RopeScaling, get_preset
from llamaforge.inference.cache import PagedKVCache
from llamaforge.model import MoE, apply_rope, build_model, rope_frequencies


def _model(name, **overrides):
    torch.manual_seed(0)
    return build_model(get_preset(name, **overrides)).eval()


@pytest.mark.parametrize("name", ["tiny", "tiny-mha", "tiny-moe"])
def test_kv_cache_matches_full_forward(name):
    model = _model(name, max_seq_len=64)
    tokens = torch.randint(0, model.config.vocab_size, (2, 40))
    cache = PagedKVCache.for_model(model, 128, block_size=8)
    seqs = [cache.sequence(64) for _ in range(2)]

    def run(t0: int, t1: int) -> torch.Tensor:
        pos = torch.arange(t0, t1).expand(2, t1 - t0)
        return model(tokens[:, t0:t1], pos, cache=cache.prepare(seqs, pos))

    with torch.inference_mode():
        full = model(tokens)
        pieces = [run(0, 25)]  # prefill crosses a 16-token attention chunk and several cache blocks
        pieces += [run(t, t + 1) for t in range(25, 40)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    assert not any("cache" in name for name, _ in model.named_buffers())  # the model keeps no cache


def test_rows_at_different_positions_match_single_sequences():
    """Right-padded prompts of different lengths, each at its own positions, equal separate runs."""
    model = _model("tiny")
    a, b = torch.randint(0, 512, (1, 9)), torch.randint(0, 512, (1, 5))
    cache = PagedKVCache.for_model(model, 64, block_size=4)
    seq_a, seq_b = cache.sequence(16), cache.sequence(16)
    with torch.inference_mode():
        want_a, want_b = model(a)[0, -1], model(b)[0, -1]
        batch = torch.zeros(2, 9, dtype=torch.long)
        batch[0], batch[1, :5] = a[0], b[0]
        pos = torch.arange(9).expand(2, 9)
        logits = model(batch, pos, cache=cache.prepare([seq_a, seq_b], pos))
        torch.testing.assert_close(logits[0, 8], want_a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[1, 4], want_b, atol=1e-5, rtol=1e-5)
        # b continues at position 5 (its pad garbage at 5..8 is overwritten or masked).
        nxt = torch.randint(0, 512, (1, 1))
        step = model(nxt, torch.tensor([[5]]), cache=cache.prepare([seq_b], torch.tensor([[5]])))
        torch.testing.assert_close(step[0, 0], model.forward(torch.cat([b, nxt], 1))[0, -1], atol=1e-5, rtol=1e-5)


def test_attention_equals_explicit_softmax_with_repeated_kv_heads():
    model = _model("tiny")
    att, cfg = model.layers[0].attention, model.config
    x = torch.randn(1, 7, cfg.dim)
    pos = torch.arange(7)[None]
    cos, sin = (t.unsqueeze(2) for t in _angles(model, pos))
    with torch.no_grad():
        got = att(x, cos, sin, pos, None, None)
        q = apply_rope(att.wq(x).view(1, 7, 4, 16), cos, sin).transpose(1, 2)
        k = apply_rope(att.wk(x).view(1, 7, 2, 16), cos, sin).transpose(1, 2).repeat_interleave(2, 1)
        v = att.wv(x).view(1, 7, 2, 16).transpose(1, 2).repeat_interleave(2, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(16) + torch.full((7, 7), -math.inf).triu(1)
        want = att.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 7, -1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _angles(model, pos):
    a = pos.float()[..., None] * model.rope_freqs
    return a.cos(), a.sin()


def test_rope_rotates_adjacent_pairs_like_complex_multiplication():
    x = torch.randn(1, 3, 2, 8)
    freqs = rope_frequencies(get_preset("tiny", head_dim=8))
    pos = torch.arange(3)[None]
    angles = pos.float()[..., None] * freqs
    got = apply_rope(x, angles.cos().unsqueeze(2), angles.sin().unsqueeze(2))
    want = torch.view_as_real(torch.view_as_complex(x.reshape(1, 3, 2, 4, 2)) * torch.polar(
        torch.ones_like(angles), angles)[:, :, None, :]).flatten(-2)  # fmt: skip
    torch.testing.assert_close(got, want)


def test_rope_compiled_real_form_matches_eager_complex_form():
    """Under torch.compile apply_rope takes its real-valued form: same values and gradients as eager."""
    x = torch.randn(2, 5, 3, 8, requires_grad=True)
    angles = torch.arange(5).float()[None, :, None] * rope_frequencies(get_preset("tiny", head_dim=8))
    cos, sin = angles.cos().unsqueeze(2).expand(2, 5, 1, 4), angles.sin().unsqueeze(2).expand(2, 5, 1, 4)
    grad = torch.randn(2, 5, 3, 8)
    results = []
    for fn in (apply_rope, torch.compile(apply_rope, backend="eager", fullgraph=True)):
        y = fn(x, cos, sin)
        results.append((y, torch.autograd.grad(y, x, grad)[0]))
    torch.testing.assert_close(results[0], results[1])


def test_llama31_rope_scaling_matches_published_formula():
    """Element-by-element re-derivation of Meta's apply_scaling (wavelength bands)."""
    s = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
    cfg = get_preset("llama-3.1-8b")
    base = rope_frequencies(cfg.replace(rope_scaling=None))
    want = []
    for f in base.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < s.original_max_seq_len / s.high_freq_factor:
            want.append(f)
        elif wavelen > s.original_max_seq_len / s.low_freq_factor:
            want.append(f / s.factor)
        else:
            smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            want.append((1 - smooth) * f / s.factor + smooth * f)
    torch.testing.assert_close(rope_frequencies(cfg), torch.tensor(want), rtol=1e-6, atol=0)
    # Llama 4's high == low factor (a degenerate band) must not produce NaNs.
    assert torch.isfinite(rope_frequencies(get_preset("llama-4-scout-17b-16e"))).all()


def test_moe_equals_dense_formulation():
    """Meta's formulation: every expert sees every token, scaled by sigmoid(score) (0 when not chosen)."""
    torch.manual_seed(0)
    cfg = get_preset("tiny-moe", n_experts_per_token=2)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 5, cfg.dim)
    with torch.no_grad():
        flat = x.reshape(-1, cfg.dim)
        scores = moe.router(flat)
        top, idx = scores.topk(2, dim=-1)
        gates = torch.full_like(scores, -math.inf).scatter(1, idx, top).sigmoid()
        want = moe.shared_expert(flat)
        for e in range(cfg.n_experts):
            xe = flat * gates[:, e : e + 1]
            want = want + (F.silu(xe @ moe.experts.w1[e]) * (xe @ moe.experts.w3[e])) @ moe.experts.w2[e]
        torch.testing.assert_close(moe(x), want.view_as(x), atol=1e-5, rtol=1e-5)


def test_llama4_layer_pattern():
    cfg = get_preset("tiny-moe")
    model = _model("tiny-moe")
    kinds = [type(layer.feed_forward).__name__ for layer in model.layers]
    assert kinds == ["FeedForward", "MoE", "FeedForward", "MoE"]  # moe_every=2
    assert [layer.attention.use_rope for layer in model.layers] == [True, True, True, False]  # NoPE every 4th
    assert cfg.is_moe_layer(1) and not cfg.is_moe_layer(0)


def test_tied_embeddings_share_storage_and_bf16_keeps_rope_fp32():
    model = _model("smollm2-135m", n_layers=1)
    assert model.output.weight is model.tok_embeddings.weight
    model.to(torch.bfloat16)
    assert model.rope_freqs.dtype == torch.float32
    assert model.output.weight is model.tok_embeddings.weight


def test_meta_device_build_allocates_nothing_until_materialized():
    with torch.device("meta"):
        from llamaforge.model import Transformer

        big = Transformer(get_preset("llama-2-70b"))
    assert all(p.is_meta for p in big.parameters())


def test_cache_errors_are_clear():
    model = _model("tiny")
    with pytest.raises(ValueError, match="without a cache"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))
    cache = PagedKVCache.for_model(model, 64)
    with pytest.raises(ValueError, match="needs input_pos"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache.view([cache.sequence(8)], torch.tensor([[0]])))
    with pytest.raises(ValueError, match="does not fit in a KV cache of 64 tokens"):
        cache.sequence(100)
