"""Native kernels (llamaforge/kernels): each op against torch / model.py references, and the modules' dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamaforge import kernels
from llamaforge.model import KVCache, RMSNorm, apply_rope, rope_cos_sin
from llamaforge.quantize import BlockInt8Linear, Int4Linear, Int8Linear

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the native kernels could not be built")

ROWS = [1, 3, 16]
N, K = 37, 256  # odd output width; K a multiple of every group size


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(got, ref, rtol=rel, atol=rel * ref.abs().max().item())


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_float(m, dtype):
    torch.manual_seed(0)
    x, w = torch.randn(m, K), torch.randn(N, K).to(dtype)
    _close(kernels.linear_float(x, w), F.linear(x, w.float()))


@pytest.mark.parametrize("m", ROWS)
def test_linear_int8(m):
    torch.manual_seed(0)
    x, q, scales = torch.randn(m, K), torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N)
    _close(kernels.linear_int8(x, q, scales), F.linear(x, q.float() * scales[:, None]))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_linear_int4(m, group):
    torch.manual_seed(0)
    x = torch.randn(m, K)
    packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    sz = torch.randn(K // group, N, 2)  # Int4Linear's scales_and_zeros layout
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).view(N, K).float()  # column 2j in the low nibble
    scales, zeros = sz[..., 0].t().repeat_interleave(group, 1), sz[..., 1].t().repeat_interleave(group, 1)
    ref = F.linear(x, (codes - 8) * scales + zeros)
    # x is rounded to int16 per 32 columns inside: about 1e-5 of the largest output (bfloat16 would be 4e-3)
    _close(kernels.linear_int4(x, packed, kernels.int4_scale_bias(sz), group), ref, rel=1e-4)


@pytest.mark.parametrize("m", ROWS)
def test_linear_q8_0(m):
    torch.manual_seed(0)
    x, q, scales = torch.randn(m, K), torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N, K // 32)
    mod = BlockInt8Linear.from_blocks(q, scales)  # stores [K/32, N, 32] blocks
    ref = F.linear(x, q.float() * scales.repeat_interleave(32, 1))
    _close(kernels.linear_q8_0(x, mod.qweight, mod.scales), ref, rel=1e-4)  # int16 activations, as for int4


def test_leading_dims_and_dtype_kept():
    x, w = torch.randn(2, 3, K, dtype=torch.bfloat16), torch.randn(N, K)
    y = kernels.linear_float(x, w)
    assert y.shape == (2, 3, N) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x.float(), w).bfloat16())


@pytest.mark.parametrize("make", [Int8Linear.from_float, lambda w: Int4Linear.from_float(w, 32),
                                  lambda w: BlockInt8Linear.from_blocks(*_q8(w))])  # fmt: skip
def test_quantized_modules_dispatch_to_native(make):
    torch.manual_seed(0)
    mod = make(torch.randn(48, K) * 0.1)
    x = torch.randn(3, K)
    ref = F.linear(x, mod.dequantize())
    _close(mod(x), ref, rel=1e-4)  # native: float32 or int16 activations, so close to the dequantized matmul
    with kernels.disabled():
        assert not kernels.available()
        torch.testing.assert_close(mod(x), ref, rtol=0.02, atol=0.02)  # torch's kernels: bfloat16 activations


def _q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = w.view(w.shape[0], -1, 32)
    scales = blocks.abs().amax(-1) / 127
    return torch.round(blocks / scales[..., None]).to(torch.int8).view_as(w), scales


@pytest.mark.parametrize("rows", [1, 3])
def test_rms_norm_matches_model(rows):
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = torch.randn(96)
    x = torch.randn(rows, 96)
    _close(kernels.rms_norm(x, norm.weight, norm.eps), norm(x).detach())


def test_silu_mul_matches_model():
    g = torch.randn(3, 2 * 100) * 4
    _close(kernels.silu_mul(g), F.silu(g[:, :100]) * g[:, 100:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 6])  # 6: the plain-C++ path
def test_decode_attention_matches_model(dtype, head_dim):
    """RoPE + cache write + attention against model.py's apply_rope, KVCache.update and SDPA."""
    torch.manual_seed(0)
    B, H, Hkv, D, S, cache_len = 2, 6, 2, head_dim, 40, 32
    rows, positions = torch.tensor([2, 0]), torch.tensor([[17], [5]])
    freqs = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    cos, sin = rope_cos_sin(freqs, positions)
    qkv = torch.randn(B, 1, (H + 2 * Hkv) * D)
    ref_cache, cache = (KVCache(3, S, Hkv, D, dtype, "cpu") for _ in range(2))
    for c in (ref_cache, cache):  # earlier positions already filled
        c.k.copy_(torch.randn(c.k.shape, generator=torch.Generator().manual_seed(1)))
        c.v.copy_(torch.randn(c.v.shape, generator=torch.Generator().manual_seed(2)))

    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k = apply_rope(q.view(B, 1, H, D), cos, sin), apply_rope(k.view(B, 1, Hkv, D), cos, sin)
    keys, values = ref_cache.update(positions, k.transpose(1, 2), v.view(B, 1, Hkv, D).transpose(1, 2), cache_len, rows)
    mask = torch.arange(cache_len)[None, None, None, :] <= positions[:, None, :, None]
    ref = F.scaled_dot_product_attention(q.transpose(1, 2).to(dtype).float(), keys.float(), values.float(),
                                         attn_mask=mask, enable_gqa=True)  # fmt: skip
    ref = ref.transpose(1, 2).reshape(B, H * D)

    got = kernels.decode_attention(qkv.view(B, -1), cos.view(B, -1), sin.view(B, -1), cache.k, cache.v,
                                   positions.view(B), rows, H, Hkv, cache_len)  # fmt: skip
    torch.testing.assert_close(cache.k, ref_cache.k, rtol=1e-6, atol=1e-6)  # torch's own paths differ by an ulp
    assert torch.equal(cache.v, ref_cache.v)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # the reference rounds q to the cache dtype
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("LLAMAFORGE_NATIVE", "0")
    assert not kernels.available()


@pytest.mark.parametrize(
    "make", [lambda w: Int4Linear.from_float(w, 32), lambda w: BlockInt8Linear.from_blocks(*_q8(w))]
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_give_nan_like_a_float_matmul(make, bad):
    """4-bit and Q8_0 kernels round activations to int16; a NaN/inf must not be rounded into a number."""
    torch.manual_seed(0)
    mod = make(torch.randn(48, K))
    x = torch.randn(2, K)
    x[0, 5] = bad
    y = mod(x)
    assert torch.isnan(y[0]).all()
    _close(y[1], F.linear(x[1:], mod.dequantize())[0], rel=1e-4)
