"""Weight-only quantization: int8/int4 linears, GGUF-block linears, whole models, save/load, errors."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llamaforge.config import get_preset
from llamaforge.gguf_quants import dequantize, quantize
from llamaforge.inference.cache import PagedKVCache
from llamaforge.model import build_model
from llamaforge.quantize import (
    BlockInt8Linear,
    GGUFLinear,
    Int4Linear,
    Int8Linear,
    QuantizedExperts,
    gguf_linear,
    load_quantized,
    parse_scheme,
    quantize_model,
    quantized_modules,
    save_quantized,
)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def weight() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(96, 256) * 0.05


def test_int8_linear_matches_float(weight):
    x = torch.randn(3, 5, 256)
    ref = x @ weight.t()
    mod = Int8Linear.from_float(weight)
    # Each weight is off by at most half a step of its row's scale.
    step = weight.abs().amax(1, keepdim=True) / 127
    assert ((mod.dequantize() - weight).abs() <= step / 2 + 1e-7).all()
    exact = Int8Linear.from_float(weight, compute_dtype=torch.float32)
    torch.testing.assert_close(exact(x[:, :2]), x[:, :2] @ exact.dequantize().t(), rtol=1e-5, atol=1e-5)
    assert _rel_err(mod(x[:, :2]), ref[:, :2]) < 0.02  # bfloat16 activations + int8 weights
    assert mod(x).shape == (3, 5, 96)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_linear_matches_float(weight, group):
    x = torch.randn(2, 256)
    mod = Int4Linear.from_float(weight, group)
    g = weight.view(96, -1, group)
    step = (g.amax(-1) - g.amin(-1)) / 15
    err = (mod.dequantize() - weight).view(96, -1, group).abs()
    assert (err <= step.unsqueeze(-1) / 2 + 1e-6).all()
    exact = Int4Linear.from_float(weight, group, compute_dtype=torch.float32)
    torch.testing.assert_close(exact(x), x @ exact.dequantize().t(), rtol=1e-5, atol=1e-5)
    assert _rel_err(mod(x), x @ weight.t()) < 0.15  # 4-bit weights: a few percent of noise


def test_large_batches_take_the_dequantized_path(weight):
    mod = Int4Linear.from_float(weight, 32)
    x = torch.randn(64, 256)
    torch.testing.assert_close(mod(x), x @ mod.dequantize().t())
    # The kernel path (few rows) agrees with it up to bfloat16 rounding of the activations.
    assert _rel_err(mod(x[:4]), x[:4] @ mod.dequantize().t()) < 0.01


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_gguf_block_linear_equals_dequantized_matmul(weight, qtype):
    blocks = quantize(weight, qtype)
    ref_w = dequantize(blocks, qtype, tuple(weight.shape))
    mod = gguf_linear(blocks, qtype, tuple(weight.shape), compute_dtype=torch.float32)
    assert isinstance(mod, BlockInt8Linear if qtype == Q.Q8_0 else Int4Linear)
    torch.testing.assert_close(mod.dequantize(), ref_w, rtol=1e-6, atol=1e-7)
    x = torch.randn(3, 256)
    torch.testing.assert_close(mod(x), x @ ref_w.t(), rtol=1e-5, atol=1e-5)
    fast = gguf_linear(blocks, qtype, tuple(weight.shape))  # default bfloat16 activations on CPU
    assert _rel_err(fast(x), x @ ref_w.t()) < 0.01


def test_gguf_q4_k_blocks():
    torch.manual_seed(1)
    n, k = 32, 512
    blocks = torch.randint(0, 256, (n, k // 256, 144), dtype=torch.uint8)
    blocks[..., 0:2] = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)  # d
    blocks[..., 2:4] = torch.tensor([0.002], dtype=torch.float16).view(torch.uint8)  # dmin
    blocks = blocks.view(n, -1)
    ref_w = dequantize(blocks, Q.Q4_K, (n, k))
    mod = gguf_linear(blocks, Q.Q4_K, (n, k), compute_dtype=torch.float32)
    torch.testing.assert_close(mod.dequantize(), ref_w, rtol=1e-5, atol=1e-6)
    x = torch.randn(2, k)
    torch.testing.assert_close(mod(x), x @ ref_w.t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["int8", "int4", "int4-g32"])
def test_quantized_tiny_model_logits_close_to_float(scheme):
    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).eval()
    tokens = torch.randint(0, 512, (2, 12))
    with torch.inference_mode():
        ref = model(tokens)
        quantize_model(model, scheme)
        out = model(tokens)
    names = set(quantized_modules(model))
    assert "output" in names and "layers.1.feed_forward.w2" in names and "layers.0.attention.wq" in names
    assert isinstance(model.tok_embeddings, torch.nn.Embedding)
    assert _rel_err(out, ref) < (0.03 if scheme == "int8" else 0.2)
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl.item() < (1e-3 if scheme == "int8" else 2e-2)


def test_tied_head_is_quantized_as_a_copy():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny").replace(tie_embeddings=True)).eval()
    emb = model.tok_embeddings.weight.clone()
    quantize_model(model, "int8")
    assert isinstance(model.output, Int8Linear)
    assert torch.equal(model.tok_embeddings.weight, emb)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_save_load_round_trip(tmp_path, scheme):
    torch.manual_seed(0)
    model = quantize_model(build_model(get_preset("tiny").replace(tie_embeddings=True)).eval(), scheme)
    save_quantized(model, tmp_path / "q")
    back = load_quantized(tmp_path / "q")
    assert set(quantized_modules(back)) == set(quantized_modules(model))
    tokens = torch.randint(0, 512, (1, 10))
    with torch.inference_mode():
        torch.testing.assert_close(back(tokens), model(tokens), rtol=0, atol=0)
    # The cache and generation path works on the loaded model too.
    cache = PagedKVCache.for_model(back, 32)
    with torch.inference_mode():
        pos = torch.tensor([[0]])
        step = back(tokens[:, :1], pos, cache=cache.prepare([cache.sequence(16)], pos))
    assert step.shape == (1, 1, 512)


def test_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        parse_scheme("int3")
    with pytest.raises(ValueError, match="unsupported int4 group size 48"):
        parse_scheme("int4", group_size=48)
    with pytest.raises(ValueError, match="names group size 64"):
        parse_scheme("int4-g64", group_size=32)
    model = build_model(get_preset("tiny")).eval()
    with pytest.raises(ValueError, match=r"feed_forward.w2: in_features 160 is not a multiple .* 64"):
        quantize_model(model, "int4-g64")
    assert not quantized_modules(model)  # checked before anything changed
    with pytest.raises(ValueError, match="out_features 40 is not a multiple of 16"):
        Int4Linear.from_float(torch.randn(40, 64), 32)
    with pytest.raises(ValueError, match="no quantized layers"):
        save_quantized(model, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match=r"quantization\.json"):
        load_quantized(tmp_path)
    with pytest.raises(ValueError, match="has no int4/int8 form"):
        gguf_linear(torch.zeros(4, 2 * 64, dtype=torch.uint8), Q.F16, (4, 64))


def test_kv_cache_float16_for_quantized_float32_models():
    from llamaforge.inference import Engine, SamplingParams
    from llamaforge.quantize import kv_cache_dtype

    model = build_model(get_preset("tiny")).eval()
    assert kv_cache_dtype(model) is None  # float models keep their own dtype
    quantize_model(model, "int4")
    assert kv_cache_dtype(model) == torch.float16
    engine = Engine(model, max_batch=2, max_seq_len=64)
    assert engine.cache.k.dtype == torch.float16
    # Prefill (torch's attention, float32 queries on float16 keys) and decode steps run on it.
    (done,) = engine.run([engine.add([1, 2, 3, 4, 5], SamplingParams(max_new_tokens=4, temperature=0))])
    assert len(done.token_ids) == 4
    half = build_model(get_preset("tiny"), dtype=torch.bfloat16).eval()
    quantize_model(half, "int8")
    assert kv_cache_dtype(half) is None  # a 16-bit model's cache is already 16-bit


@pytest.mark.parametrize("rows", [1, 16, 24, 40])  # native kernels, torch's int kernels, the dequantized GEMM
@pytest.mark.parametrize("make", [Int8Linear.from_float, lambda w: Int4Linear.from_float(w, 32)])
def test_quantized_linears_are_correct_under_autograd(make, rows):
    """With gradients wanted (LoRA / QLoRA training on a quantized base), every path gives the gradient of the
    dequantized matmul with respect to the input; none silently returns an output without a gradient."""
    torch.manual_seed(0)
    mod = make(torch.randn(64, 128) * 0.1)
    x = torch.randn(rows, 128, requires_grad=True)
    y = mod(x)
    assert y.requires_grad
    grad_out = torch.randn_like(y)
    (x_grad,) = torch.autograd.grad(y, x, grad_out)
    torch.testing.assert_close(x_grad, grad_out @ mod.dequantize(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, x @ mod.dequantize().T, rtol=2e-2, atol=2e-2)


# Llama 4 experts ---------------------------------------------------------------------------------------------
def _moe_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(get_preset("tiny-moe", n_experts=8, n_experts_per_token=2)).eval()


@pytest.mark.parametrize("scheme,kind", [("int8", Int8Linear), ("int4", Int4Linear), ("q8_0", GGUFLinear)])
def test_quantized_experts(scheme: str, kind: type) -> None:
    model = _moe_model()
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(tokens)
    quantize_model(model, scheme)
    moe = model.layers[1].feed_forward
    assert isinstance(moe.experts, QuantizedExperts) and len(moe.experts.w1) == 8
    assert all(isinstance(m, kind) for part in (moe.experts.w1, moe.experts.w2, moe.experts.w3) for m in part)
    assert type(moe.router) is torch.nn.Linear  # the router stays float, as llama.cpp keeps ffn_gate_inp
    assert (moe.experts.w1[0].in_features, moe.experts.w1[0].out_features) == (64, 96)
    assert (moe.experts.w2[0].in_features, moe.experts.w2[0].out_features) == (96, 64)
    with torch.inference_mode():
        assert _rel_err(model(tokens), ref) < (0.2 if scheme == "int4" else 0.03)  # 4 bits: noise and re-routing


def test_quantized_experts_run_once_per_active_expert() -> None:
    """Tokens are grouped by expert: each expert that received tokens runs one matmul per projection per forward."""
    model = quantize_model(_moe_model(), "int8")
    moe = model.layers[1].feed_forward
    calls: list[int] = []
    for e, lin in enumerate(moe.experts.w1):
        lin.register_forward_hook(lambda mod, inp, out, e=e: calls.append((e, inp[0].shape[0])))
    chosen: list[torch.Tensor] = []
    moe.router.register_forward_hook(lambda mod, inp, out: chosen.append(out.topk(2, dim=-1).indices))
    with torch.inference_mode():
        model(torch.randint(0, 512, (3, 10), generator=torch.Generator().manual_seed(2)))
    active, counts = chosen[0].unique(return_counts=True)
    assert sorted(calls) == sorted(zip(active.tolist(), counts.tolist()))


@pytest.mark.parametrize("scheme", ["int4", "q4_k_m"])
def test_quantized_experts_save_and_load(scheme: str, tmp_path) -> None:
    model = quantize_model(_moe_model(), scheme)
    save_quantized(model, tmp_path / "q")
    back = load_quantized(tmp_path / "q")
    assert isinstance(back.layers[3].feed_forward.experts, QuantizedExperts)
    tokens = torch.randint(0, 512, (1, 20))
    with torch.inference_mode():
        assert torch.equal(back(tokens), model(tokens))


def test_gguf_experts_run_as_stored(tmp_path) -> None:
    from llamaforge.checkpoint import save_model
    from llamaforge.quantize import load_gguf_quantized

    model = _moe_model()
    save_model(model, tmp_path / "m.gguf", "gguf", dtype="q8_0")
    blocks = load_gguf_quantized(tmp_path / "m.gguf")
    experts = blocks.layers[1].feed_forward.experts
    assert isinstance(experts, QuantizedExperts) and isinstance(experts.w2[7], GGUFLinear)
    assert experts.w2[7].qtype == Q.Q8_0 and experts.w2[7].blocks.shape == (64, 96 // 32 * 34)
    from llamaforge.checkpoint import load_model

    dequantized, _ = load_model(tmp_path / "m.gguf", dtype=torch.float32)
    tokens = torch.randint(0, 512, (2, 12))
    with torch.inference_mode():  # the blocks' matmuls round the activations to 8 bits, as llama.cpp does
        assert _rel_err(blocks(tokens), dequantized(tokens)) < 0.01
        assert _rel_err(blocks(tokens), model(tokens)) < 0.03
