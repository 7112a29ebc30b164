"""Native kernels (llamaforge/kernels): linear against F.linear on each weight format, decode_step against
model.py's forward, and the modules' dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamaforge import kernels
from llamaforge.config import ModelConfig
from llamaforge.inference.cache import PagedKVCache
from llamaforge.inference.step import FastForward
from llamaforge.model import build_model
from llamaforge.quantize import BlockInt8Linear, Int4Linear, Int8Linear


@pytest.fixture(autouse=True, scope="module")
def _built():
    """The kernels must build where the tests run (CI is x86-64 Linux): a broken kernels.cpp fails here."""
    assert kernels.available(), f"the native kernels did not build: {kernels.build_error()}"


ROWS = [1, 3, 16]
N, K = 37, 256  # odd output width; K a multiple of every group size


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(got, ref, rtol=rel, atol=rel * ref.abs().max().item())


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_float(m, dtype):
    torch.manual_seed(0)
    x, w = torch.randn(m, K), torch.randn(N, K).to(dtype)
    _close(kernels.linear(x, w), F.linear(x, w.float()))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k", [K, 40])  # 40: not a multiple of 32, float activations
def test_linear_int8(m, k):
    torch.manual_seed(0)
    x, q, scales = torch.randn(m, k), torch.randint(-127, 128, (N, k), dtype=torch.int8), torch.rand(N)
    _close(kernels.linear(x, q, scales), F.linear(x, q.float() * scales[:, None]), rel=1e-4)  # int16 activations


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
    _close(kernels.linear(x, packed, kernels.int4_scale_bias(sz)), ref, rel=1e-4)


@pytest.mark.parametrize("m", ROWS)
def test_linear_q8_0(m):
    torch.manual_seed(0)
    x, q, scales = torch.randn(m, K), torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N, K // 32)
    mod = BlockInt8Linear.from_blocks(q, scales)  # stores [K/32, N, 32] blocks
    ref = F.linear(x, q.float() * scales.repeat_interleave(32, 1))
    _close(kernels.linear(x, mod.qweight, mod.scales), ref, rel=1e-4)  # int16 activations, as for int4


def test_leading_dims_and_dtype_kept():
    x, w = torch.randn(2, 3, K, dtype=torch.bfloat16), torch.randn(N, K)
    y = kernels.linear(x, w)
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


def test_linear_rejects_mismatched_inputs():
    with pytest.raises(RuntimeError, match="input has 10 features, the weights take 256"):
        kernels.linear(torch.randn(1, 10), torch.randn(N, K))
    with pytest.raises(RuntimeError, match="scales must be float32"):
        kernels.linear(torch.randn(1, K), torch.zeros(N, K, dtype=torch.int8), torch.rand(N + 1))


def _step_model(dtype: torch.dtype, head_dim: int, scheme: str | None = None):
    """Two layers, GQA (6 query heads on 2 KV heads); three sequences in a paged cache (blocks of 4, taken in
    an interleaved order) whose first 20 positions hold earlier tokens. Returns (model, cache, sequences)."""
    torch.manual_seed(0)
    config = ModelConfig(dim=6 * head_dim, n_layers=2, n_heads=6, n_kv_heads=2, hidden_dim=64, vocab_size=128,
                         max_seq_len=64)  # fmt: skip
    model = build_model(config, dtype=dtype).eval()
    for name, w in model.named_parameters():  # norm weights away from 1, so that a missed one shows
        if name.endswith("norm.weight"):
            w.data.uniform_(0.5, 1.5)
    if scheme:
        from llamaforge.quantize import quantize_model

        quantize_model(model, scheme)
    cache = PagedKVCache.for_model(model, 3 * 40, block_size=4)
    seqs = [cache.sequence(40) for _ in range(3)]
    for n in range(4, 41, 4):
        for seq in reversed(seqs):
            cache.ensure(seq, n)
    pos = torch.arange(20).expand(3, 20)
    with torch.inference_mode():
        model(torch.randint(0, 128, (3, 20)), pos, cache=cache.view(seqs, pos))
    return model, cache, seqs


def _step(fn, cache, seqs, tokens, positions, **kw):
    return fn(tokens, positions, cache=cache.view(seqs, positions, width=8), **kw)


@pytest.mark.parametrize(("dtype", "head_dim", "scheme"), [
    (torch.float32, 16, None), (torch.float32, 6, None), (torch.bfloat16, 16, None), (torch.float16, 16, None),
    (torch.float32, 32, "int8"), (torch.float32, 32, "int4"),
])  # fmt: skip
@torch.inference_mode()
def test_decode_step_matches_model(dtype, head_dim, scheme):
    """One token for each of two sequences (the third and the first, at different positions): decode_step's
    hidden state and the keys/values it writes through the block tables against model.py's forward (RoPE, cache
    update, SDPA, SwiGLU). head_dim 6 takes the plain C++ attention, 16 the AVX2 one."""
    model, cache, seqs = _step_model(dtype, head_dim, scheme)
    ref_model, ref_cache, ref_seqs = _step_model(dtype, head_dim, scheme)
    fast = FastForward(model)
    assert fast.native
    tokens, positions = torch.tensor([[5], [77]]), torch.tensor([[17], [5]])
    got = _step(fast, cache, [seqs[2], seqs[0]], tokens, positions, return_hidden=True)
    ref = _step(ref_model, ref_cache, [ref_seqs[2], ref_seqs[0]], tokens, positions, return_hidden=True)
    # Reference rounding: model.py keeps 16-bit activations between ops, the kernel float32.
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype] if scheme is None else 1e-3
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(cache.k.float(), ref_cache.k.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(cache.v.float(), ref_cache.v.float(), rtol=tol, atol=tol)


@torch.inference_mode()
def test_decode_step_rows_of_one_sequence_attend_causally():
    """Three consecutive tokens of one sequence and one of another in one call (draft verification): each row
    sees its own sequence's earlier rows, like a 3-token forward of the model."""
    model, cache, seqs = _step_model(torch.float32, 16)
    ref_model, ref_cache, ref_seqs = _step_model(torch.float32, 16)
    fast = FastForward(model)
    tokens = torch.tensor([[5, 6, 7], [77, 0, 0]])
    positions = torch.tensor([[20, 21, 22], [20, 21, 22]])  # the second row's last two are padding
    got = _step(fast, cache, [seqs[1], seqs[2]], tokens, positions, return_hidden=True)
    ref = _step(ref_model, ref_cache, [ref_seqs[1], ref_seqs[2]], tokens, positions, return_hidden=True)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_decode_step_projection_in_parts():
    """q/k int4 and v float (as in GGUF Q4_K_M files, whose attn_v is Q6_K): qkv runs as two parts."""
    built = []
    for _ in range(2):
        model, cache, seqs = _step_model(torch.float32, 32, "int4")
        for layer in model.layers:
            att = layer.attention
            att.wv = torch.nn.Linear(att.wv.in_features, att.wv.out_features, bias=False)
            att.wv.weight.data = torch.randn(att.wv.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.1
        built.append((model, cache, seqs))
    fast = FastForward(built[0][0])
    assert fast._native is not None and fast._native[1][0] == 2  # layer 0's qkv: two parts
    tokens, positions = torch.tensor([[5]]), torch.tensor([[20]])
    got = _step(fast, built[0][1], built[0][2][:1], tokens, positions)
    ref = _step(built[1][0], built[1][1], built[1][2][:1], tokens, positions)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


def test_decode_step_sees_norm_updates_after_preparation():
    """A 16-bit model's norm weights are read each step, not copied once (training between generations)."""
    (model, cache, seqs), (ref, ref_cache, ref_seqs) = _step_model(torch.bfloat16, 16), _step_model(torch.bfloat16, 16)
    fast = FastForward(model)
    with torch.no_grad():
        for m in (model, ref):
            m.layers[1].ffn_norm.weight.mul_(2)
    tokens, positions = torch.tensor([[5]]), torch.tensor([[20]])
    with torch.inference_mode():
        got = _step(fast, cache, seqs[:1], tokens, positions, return_hidden=True)
        want = _step(ref, ref_cache, ref_seqs[:1], tokens, positions, return_hidden=True)
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


def test_decode_step_long_context_slices():
    """A context long enough to be split into several slices per KV head, merged exactly; 8 query heads on
    one KV head (two passes of 4 over each slice); blocks of 16 in a shuffled order."""
    torch.manual_seed(0)
    config = ModelConfig(dim=128, n_layers=1, n_heads=8, n_kv_heads=1, hidden_dim=64, vocab_size=64,
                         max_seq_len=512)  # fmt: skip
    model, ref_model = (build_model(config).eval() for _ in range(2))
    ref_model.load_state_dict(model.state_dict())
    prompt = torch.randint(0, 64, (1, 400))
    got_ref = []
    for m in (model, ref_model):
        cache = PagedKVCache.for_model(m, 1024)
        cache._free.reverse()  # blocks handed out from the far end first
        seq = cache.sequence(512)
        with torch.inference_mode():
            pos = torch.arange(400)[None]
            m(prompt, pos, cache=cache.prepare([seq], pos))
            fn = FastForward(m) if m is model else m
            got_ref.append(
                fn(torch.tensor([[3]]), torch.tensor([[400]]), cache=cache.prepare([seq], torch.tensor([[400]])))
            )
    torch.testing.assert_close(got_ref[0], got_ref[1], rtol=1e-4, atol=1e-4)


def test_decode_step_rejects_bad_positions_and_blocks():
    model, cache, seqs = _step_model(torch.float32, 16)
    fast = FastForward(model)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="position 40 is outside the block table's 8 blocks"):
            fast(torch.tensor([[5]]), torch.tensor([[40]]), cache=cache.view(seqs[:1], torch.tensor([[20]]), width=8))
        view = cache.view(seqs[:1], torch.tensor([[20]]))
        view.table[0, 2] = 10_000
        with pytest.raises(RuntimeError, match="block 10000 is outside the pool"):
            fast(torch.tensor([[5]]), torch.tensor([[20]]), cache=view)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("LLAMAFORGE_NATIVE", "0")
    assert not kernels.available()


@pytest.mark.parametrize(
    "make",
    [Int8Linear.from_float, lambda w: Int4Linear.from_float(w, 32), lambda w: BlockInt8Linear.from_blocks(*_q8(w))],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_give_nan_like_a_float_matmul(make, bad):
    """Integer kernels round activations to int16; a NaN/inf must not be rounded into a number."""
    torch.manual_seed(0)
    mod = make(torch.randn(48, K))
    x = torch.randn(2, K)
    x[0, 5] = bad
    y = mod(x)
    assert torch.isnan(y[0]).all()
    _close(y[1], F.linear(x[1:], mod.dequantize())[0], rel=1e-4)
