"""GGUF (ggml) block formats: vectorized dequantizers (torch) and quantizers (numpy).

A quantized row of ``n`` weights is stored as ``n / block_size`` blocks of ``type_size`` bytes
(``BLOCK_SIZES``). The functions here work on uint8 tensors whose last dimension holds whole blocks,
so a GGUF matrix stored as ``[rows, bytes_per_row]`` dequantizes to ``[rows, n]``, and ``quantize`` /
``quantize_weights`` give that layout back. The arithmetic follows ggml's reference code operation for
operation, in float32, so dequantized values are bit-identical to ``gguf.quants.dequantize`` and quantized
blocks to llama.cpp's quantizer (the tests compare them).

Block layouts (little endian, ``d``/``m``/``dmin`` are float16):

- Q8_0 (32 weights, 34 B): ``d, q[32] int8``; ``w = d * q``.
- Q4_0 (32, 18 B): ``d, qs[16]``; low nibbles are weights 0..15, high nibbles 16..31; ``w = d * (q - 8)``.
- Q4_1 (32, 20 B): ``d, m, qs[16]``; ``w = d * q + m``.
- Q5_0 / Q5_1 (32, 22 / 24 B): as Q4_0 / Q4_1 plus ``qh`` (32 fifth bits); Q5_0 subtracts 16.
- K-quants (256-weight super-blocks): Q2_K, Q3_K, Q4_K, Q5_K (16 or 8 sub-blocks with 4-/6-bit
  scales and mins), Q6_K (16 sub-blocks of 16, int8 scales).
- IQ4_NL (32, 18 B): ``d, qs[16]``, the nibbles index a fixed grid of 16 values; IQ4_XS (256, 136 B): ``d``,
  8 six-bit sub-block scales (minus 32), the same grid.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor

QK_K = 256
Q = GGMLQuantizationType

# (weights per block, bytes per block) for every type ggml defines.
BLOCK_SIZES: dict[GGMLQuantizationType, tuple[int, int]] = dict(GGML_QUANT_SIZES)


def _f16(b: Tensor) -> Tensor:
    """Two bytes per row (uint8 [..., 2]) -> float32 [..., 1]."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """uint8 [n, k] -> [n, 2k]: the k low nibbles, then the k high nibbles (ggml's 32-weight order)."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _bits(qh: Tensor) -> Tensor:
    """uint8 [n, k] -> [n, 8k] of 0/1: bit j of the little-endian bit string (byte j // 8, bit j % 8)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).flatten(-2)


# Dequantizers: fill float32 out [n, block_size] from uint8 blocks [n, type_size] ----------------
# The hot formats write straight into `out` and scale in place: fewer passes over memory, same arithmetic.
def _split_nibbles(qs: Tensor, out: Tensor) -> None:
    """uint8 [n, ..., k] -> out [n, ..., 2, k]: the low nibbles, then the high nibbles (ggml's order)."""
    out.select(-2, 0).copy_(qs & 0x0F)
    out.select(-2, 1).copy_(qs >> 4)


def _deq_q8_0(b: Tensor, out: Tensor) -> None:
    out.copy_(b[:, 2:].contiguous().view(torch.int8))
    out.mul_(_f16(b[:, :2]))


def _deq_q4_0(b: Tensor, out: Tensor) -> None:
    _split_nibbles(b[:, 2:], out.view(-1, 2, 16))
    out.sub_(8).mul_(_f16(b[:, :2]))


def _deq_q4_1(b: Tensor, out: Tensor) -> None:
    _split_nibbles(b[:, 4:], out.view(-1, 2, 16))
    out.mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _deq_q5_0(b: Tensor, out: Tensor) -> None:
    out.copy_(_nibbles(b[:, 6:]) | (_bits(b[:, 2:6]) << 4))
    out.sub_(16).mul_(_f16(b[:, :2]))


def _deq_q5_1(b: Tensor, out: Tensor) -> None:
    out.copy_(_nibbles(b[:, 8:]) | (_bits(b[:, 4:8]) << 4))
    out.mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _k_scale_min(scales: Tensor) -> tuple[Tensor, Tensor]:
    """The 8 six-bit scales and mins packed in Q4_K/Q5_K's 12 bytes -> two uint8 [n, 8]."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _k_scales(b: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K sub-block scales d * sc and offsets dmin * m, float32 [n, 8, 1]."""
    sc, mn = _k_scale_min(b[:, 4:16])
    n = b.shape[0]
    return (_f16(b[:, :2]) * sc.float()).reshape(n, 8, 1), (_f16(b[:, 2:4]) * mn.float()).reshape(n, 8, 1)


def _deq_q4_k(b: Tensor, out: Tensor) -> None:
    n = b.shape[0]
    d, dm = _k_scales(b)
    # Each 32-byte group holds two sub-blocks: the low nibbles, then the high ones.
    _split_nibbles(b[:, 16:].reshape(n, 4, 32), out.view(n, 4, 2, 32))
    out.view(n, 8, 32).mul_(d).sub_(dm)


def _deq_q5_k(b: Tensor, out: Tensor) -> None:
    n = b.shape[0]
    d, dm = _k_scales(b)
    ql = b[:, 48:].reshape(n, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    qh = b[:, 16:48].reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
    out.view(n, 8, 32).copy_((ql & 0x0F).reshape(n, 8, 32) | ((qh & 1) << 4))
    out.view(n, 8, 32).mul_(d).sub_(dm)


def _deq_q6_k(b: Tensor, out: Tensor) -> None:
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
    ql = b[:, :128].reshape(n, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    out.view(n, 8, 32).copy_((ql & 0x0F).reshape(n, 8, 32) | ((qh & 3).reshape(n, 8, 32) << 4))
    out.sub_(32).view(n, 16, 16).mul_(d)


def _deq_q2_k(b: Tensor, out: Tensor) -> None:
    n = b.shape[0]
    scales = b[:, :16]
    dl = (_f16(b[:, 80:82]) * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (_f16(b[:, 82:84]) * (scales >> 4).float()).reshape(n, 16, 1)
    qs = b[:, 16:80].reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    out.view(n, 16, 16).copy_((qs & 3).reshape(n, 16, 16))
    out.view(n, 16, 16).mul_(dl).sub_(ml)


def _deq_q3_k(b: Tensor, out: Tensor) -> None:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    # 16 six-bit scales: low 4 bits from bytes 0..7 (both nibbles), high 2 bits from bytes 8..11.
    lo = (scales[:, :8].reshape(n, 1, 8) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 2, 1)).reshape(n, 16)
    hi = scales[:, 8:].reshape(n, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 4, 1)
    sc = ((lo & 0x0F) | ((hi.reshape(n, 16) & 3) << 4)).to(torch.int8) - 32
    dl = (_f16(b[:, 108:110]) * sc.float()).reshape(n, 16, 1)
    ql = qs.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = hmask.reshape(n, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 1, 8, 1)
    ql = (ql & 3).reshape(n, 16, 16).to(torch.int8)
    qh = ((qh & 1) ^ 1).reshape(n, 16, 16).to(torch.int8)  # a set high bit means "no offset"
    out.view(n, 16, 16).copy_(ql - (qh << 2))
    out.view(n, 16, 16).mul_(dl)


# IQ4_NL / IQ4_XS: 4-bit codes index a non-uniform grid of 16 int8 values (the GGUF specification's table).
_IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _iq4_grid(codes: Tensor) -> Tensor:
    return torch.tensor(_IQ4_VALUES, dtype=torch.float32, device=codes.device)[codes.long()]


def _deq_iq4_nl(b: Tensor, out: Tensor) -> None:
    qs = b[:, 2:]
    halves = out.view(-1, 2, 16)
    halves[:, 0].copy_(_iq4_grid(qs & 0x0F))
    halves[:, 1].copy_(_iq4_grid(qs >> 4))
    out.mul_(_f16(b[:, :2]))


def _deq_iq4_xs(b: Tensor, out: Tensor) -> None:
    n = b.shape[0]
    # 8 six-bit scales: low nibbles in bytes 4..7 (two per byte), high bit pairs in the 16-bit word at byte 2.
    lo = (b[:, 4:8].reshape(n, 4, 1) >> torch.tensor([0, 4], dtype=torch.uint8, device=b.device)).reshape(n, 8) & 0x0F
    high_word = b[:, 2].int() | (b[:, 3].int() << 8)
    hi = (high_word.reshape(n, 1) >> torch.arange(0, 16, 2, device=b.device)) & 3
    scales = (lo.int() | (hi << 4)) - 32
    qs = b[:, 8:].reshape(n, 8, 16)
    groups = out.view(n, 8, 2, 16)
    groups[:, :, 0].copy_(_iq4_grid(qs & 0x0F))
    groups[:, :, 1].copy_(_iq4_grid(qs >> 4))
    out.view(n, 8, 32).mul_(_f16(b[:, :2]).reshape(n, 1, 1) * scales.float().reshape(n, 8, 1))


def _deq_bf16(b: Tensor, out: Tensor) -> None:
    out.copy_(b.contiguous().view(torch.bfloat16))


def _deq_f16(b: Tensor, out: Tensor) -> None:
    out.copy_(b.contiguous().view(torch.float16))


def _deq_f32(b: Tensor, out: Tensor) -> None:
    out.copy_(b.contiguous().view(torch.float32))


_DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[Tensor, Tensor], None]] = {
    Q.F32: _deq_f32,
    Q.F16: _deq_f16,
    Q.BF16: _deq_bf16,
    Q.Q8_0: _deq_q8_0,
    Q.Q4_0: _deq_q4_0,
    Q.Q4_1: _deq_q4_1,
    Q.Q5_0: _deq_q5_0,
    Q.Q5_1: _deq_q5_1,
    Q.Q2_K: _deq_q2_k,
    Q.Q3_K: _deq_q3_k,
    Q.Q4_K: _deq_q4_k,
    Q.Q5_K: _deq_q5_k,
    Q.Q6_K: _deq_q6_k,
    Q.IQ4_NL: _deq_iq4_nl,
    Q.IQ4_XS: _deq_iq4_xs,
}

DEQUANTIZABLE: frozenset[GGMLQuantizationType] = frozenset(_DEQUANTIZERS)

# Weights per step: keeps each step's temporaries in cache and bounds memory for large matrices.
_CHUNK_WEIGHTS = 1 << 18


def dequantize(data: Tensor, qtype: GGMLQuantizationType | int, shape: tuple[int, ...] | None = None) -> Tensor:
    """Dequantize raw GGUF bytes to float32.

    ``data`` is a uint8 tensor whose last dimension holds a whole number of blocks (e.g. a GGUF matrix
    ``[rows, bytes_per_row]``); the result is ``[..., weights_per_row]``, or ``shape`` when given.
    """
    qtype = GGMLQuantizationType(qtype)
    fn = _DEQUANTIZERS.get(qtype)
    if fn is None:
        raise NotImplementedError(f"no dequantizer for GGUF type {qtype.name}")
    if data.dtype != torch.uint8:
        raise TypeError(f"expected uint8 blocks, got {data.dtype}")
    block, type_size = BLOCK_SIZES[qtype]
    if data.dim() == 0 or data.shape[-1] % type_size:
        raise ValueError(f"{qtype.name}: last dimension {tuple(data.shape)} is not a multiple of {type_size} bytes")
    out_shape = tuple(shape) if shape is not None else (*data.shape[:-1], data.shape[-1] // type_size * block)
    blocks = data.reshape(-1, type_size)
    n_blocks = blocks.shape[0]
    if n_blocks * block != _numel(out_shape):
        raise ValueError(f"{qtype.name}: {n_blocks} blocks of {block} weights do not fill shape {out_shape}")
    out = torch.empty((n_blocks, block), dtype=torch.float32, device=data.device)
    step = max(1, _CHUNK_WEIGHTS // block)
    for start in range(0, n_blocks, step):
        fn(blocks[start : start + step], out[start : start + step])
    return out.reshape(out_shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# Quantizers: float [..., n] -> uint8 [..., n / block * type_size] -----------------------------
# Each follows ggml's reference quantizer (quantize_row_*_ref: what llama.cpp's llama_model_quantize writes
# without an importance matrix) operation for operation in float32, vectorized over blocks, so the bytes
# come out the same as llama.cpp's (tests compare them). They run in numpy rather than torch because the
# K-quant searches are long chains of small operations that must round exactly as C does:
# - a C loop ``s += t[i]`` rounds after every term; numpy's reduction over the outer axis of a C-contiguous
#   array adds whole rows in that order (its pairwise summation applies only along the contiguous axis),
#   while torch.sum and torch.cumsum reorder the terms or accumulate in float64;
# - torch.sqrt on float32 and torch's ``scalar / tensor`` (computed as ``scalar * (1 / tensor)``) are not
#   correctly rounded; numpy's are;
# - torch hands element-wise ops over 32K elements to its OpenMP pool, which on a busy 2-core machine
#   stalls for milliseconds per op (measured: 8 ms for torch.round on 32K floats with 2 threads, 12 us with 1);
#   numpy stays on the calling thread, and ``quantize`` runs chunks on a thread pool instead.
# The searches work on sub-blocks laid out element-major, x[i, b] = weight i of sub-block b, so that each step
# of a C loop over i is one vector operation over all sub-blocks of a chunk.

_F = np.float32
_MAGIC = _F(12582912.0)  # 1.5 * 2**23: a float32 sum with it holds round-half-even(x) in its low mantissa bits
_GROUP_MAX_EPS = _F(1e-15)  # ggml's "this group is all zero" threshold


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int as int32, bit tricks included (so inf, NaN and |v| >= 2**22 give what C gives)."""
    r = (v + _MAGIC).view(np.int32)
    r &= 0x7FFFFF
    r -= 0x400000
    return r


def _levels(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``MAX(lo, MIN(hi, nearest_int(v)))`` as float32, computed in place in `v` (a temporary float32 array):
    the quantization level of each weight."""
    v += _MAGIC
    bits = v.view(np.int32)
    bits &= 0x7FFFFF
    bits |= 0x4B000000  # v = 2**23 + the low mantissa bits, so v - 1.5 * 2**23 = nearest_int(v) exactly
    v -= _MAGIC
    return np.clip(v, lo, hi, out=v)


def _scaled(x: np.ndarray, offset: np.ndarray, iscale: np.ndarray) -> np.ndarray:
    """``iscale * (x - offset)`` in a new float32 array."""
    v = np.subtract(x, offset)
    v *= iscale
    return v


def _seq_sum(t: np.ndarray, from_first: bool = False) -> np.ndarray:
    """Sum over axis 0 one term at a time, as the C loop ``s = 0; for (...) s += t[i]`` rounds in float32.

    ``from_first``: the loop starts from ``s = t[0]`` instead (the two differ only in the sign of a zero sum).
    """
    s = np.add.reduce(np.ascontiguousarray(t), axis=0)
    return s if from_first else s + _F(0)


def _signed_absmax(x: np.ndarray, axis: int) -> np.ndarray:
    """The first value of largest magnitude along `axis`, +0.0 where all are zero (ggml's ``amax < fabsf(v)`` scan)."""
    v = np.take_along_axis(x, np.expand_dims(np.abs(x).argmax(axis), axis), axis).squeeze(axis)
    return np.where(v != 0, v, _F(0))


def _positive_max(x: np.ndarray, axis: int) -> np.ndarray:
    """``m = 0; if (v > m) m = v`` along `axis`: the largest value when positive, else +0.0."""
    m = x.max(axis)
    return np.where(m > 0, m, _F(0))


def _inverse(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f``."""
    return np.where(d != 0, _F(1) / np.where(d != 0, d, _F(1)), _F(0))


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """float32 [n] or [n, 1] -> the float16 bytes, uint8 [n, 2] (round to nearest even, as GGML_FP32_TO_FP16)."""
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _f16_round(x: np.ndarray) -> np.ndarray:
    """What a float32 reads back as after a float16 store (``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x))``)."""
    return x.astype(np.float16).astype(np.float32)


def _c_byte(v: np.ndarray, top: int = 255) -> np.ndarray:
    """C's ``MIN(top, (int8_t)v)`` stored in a uint8, for float v: truncation to int32 (x86 gives INT_MIN, whose
    low byte is 0, for NaN and out-of-range values, e.g. when a denormal scale's inverse overflows), then the
    low byte as a signed value, then the clamp, then the low byte again."""
    t = np.trunc(v)
    t = np.where(np.abs(t) < 2**31, t, _F(0)).astype(np.int32).astype(np.int8).astype(np.int32)
    return (np.minimum(t, top) & 0xFF).astype(np.uint8)


def _or_shifted(q: np.ndarray, width: int, axis: int) -> np.ndarray:
    """OR the slices of uint8 `q` along `axis`, slice i shifted left by ``width * i`` bits."""
    parts = np.moveaxis(q, axis, 0)
    out = parts[0].copy()
    for i in range(1, parts.shape[0]):
        out |= parts[i] << (width * i)
    return out


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 [n, 32] of values 0..15 -> [n, 16]: weight j in the low nibble, weight j + 16 in the high one."""
    return q[:, :16] | (q[:, 16:] << 4)


# 32-weight blocks ---------------------------------------------------------------------------------
def _round_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero."""
    a = np.abs(x)
    fl = np.floor(a)
    return np.copysign(fl + np.floor(2 * (a - fl)), x)


def _q_q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=1, keepdims=True) / _F(127)
    return np.concatenate((_f16_bytes(d), _c_byte(_round_away(x * _inverse(d)))), axis=1)


def _q_q4_0(x: np.ndarray) -> np.ndarray:
    # The scale maps the weight of largest magnitude, with its sign, to -8.
    d = _signed_absmax(x, 1)[:, None] / _F(-8)
    return np.concatenate((_f16_bytes(d), _pack_nibbles(_c_byte(x * _inverse(d) + _F(8.5), 15))), axis=1)


def _q_q4_1(x: np.ndarray) -> np.ndarray:
    lo = x.min(axis=1, keepdims=True)
    d = (x.max(axis=1, keepdims=True) - lo) / _F(15)
    q = _c_byte((x - lo) * _inverse(d) + _F(0.5), 15)
    return np.concatenate((_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)), axis=1)


def _fifth_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 values (uint8 [n, 32]) as Q5_0/Q5_1's little-endian 32-bit ``qh``, uint8 [n, 4]."""
    return _or_shifted(((q >> 4) & 1).reshape(-1, 4, 8), 1, 2)


def _q_q5_0(x: np.ndarray) -> np.ndarray:
    d = _signed_absmax(x, 1)[:, None] / _F(-16)
    q = _c_byte(x * _inverse(d) + _F(16.5), 31)
    return np.concatenate((_f16_bytes(d), _fifth_bits(q), _pack_nibbles(q & 0x0F)), axis=1)


def _q_q5_1(x: np.ndarray) -> np.ndarray:
    lo = x.min(axis=1, keepdims=True)
    d = (x.max(axis=1, keepdims=True) - lo) / _F(31)
    q = _c_byte((x - lo) * _inverse(d) + _F(0.5))  # (uint8_t)(v + 0.5f): no clamp; the low five bits are kept
    return np.concatenate((_f16_bytes(d), _f16_bytes(lo), _fifth_bits(q), _pack_nibbles(q & 0x0F)), axis=1)


# K-quant searches (ggml-quants.c: make_qkx2_quants, make_qx_quants, make_q3_quants) -------------------
def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
               use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Fit ``x ~ scale * L - the_min`` (L in 0..nmax) per sub-block, minimizing the w-weighted error.

    x, w: [n, B] element-major. Starts from the min/max fit, then tries the scales ``(rmin + rdelta * is + nmax)
    / (max - min)`` one after the other, each against the offset of the best fit so far, with a least-squares
    refit of scale and offset; a trial replaces the best when its error is strictly lower. Returns scale [B],
    the_min [B] and the levels L [n, B] (float32).
    """
    lo0 = np.minimum(x.min(0), _F(0))  # ggml: if (min > 0) min = 0
    hi = x.max(0)
    sum_w = _seq_sum(w, from_first=True)
    sum_x = _seq_sum(w * x, from_first=True)
    terms = np.empty((x.shape[0], 3, x.shape[1]), dtype=np.float32)
    buf = np.empty_like(x)

    def error(scale: np.ndarray, levels: np.ndarray, offset: np.ndarray) -> np.ndarray:
        diff = np.multiply(scale, levels, out=buf)
        diff += offset
        diff -= x
        np.abs(diff, out=diff) if use_mad else np.square(diff, out=diff)
        diff *= w
        return _seq_sum(diff)

    iscale = _F(nmax) / (hi - lo0)
    scale = _F(1) / iscale
    lo = lo0
    best = error(scale, _levels(_scaled(x, lo, iscale), 0, nmax), lo)
    best_iscale, best_lo = iscale, lo  # the levels of the best fit are recomputed from these at the end
    for step in range(nstep + 1):
        c = _F(_F(rmin) + _F(rdelta) * _F(step)) + _F(nmax)
        iscale = c / (hi - lo)
        cand = _levels(_scaled(x, lo, iscale), 0, nmax)
        wl = np.multiply(w, cand, out=terms[:, 0])
        np.multiply(wl, cand, out=terms[:, 1])
        np.multiply(wl, x, out=terms[:, 2])
        sum_l, sum_l2, sum_xl = _seq_sum(terms)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        pos = this_min > 0
        this_min = np.where(pos, _F(0), this_min)
        this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, cand, this_min)
        better = (det > 0) & (cur < best)
        if better.any():
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            best_iscale = np.where(better, iscale, best_iscale)
            best_lo = np.where(better, lo, best_lo)
            lo = np.where(better, this_min, lo)
    flat = hi == lo0
    levels = np.where(flat, _F(0), _levels(_scaled(x, best_lo, best_iscale), 0, nmax))
    return np.where(flat, _F(0), scale), -np.where(flat, lo0, lo), levels


def _make_qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants with rmse_type 1 and no importance weights (the Q6_K search), x [n, B].

    Levels -nmax..nmax-1 at the trial scales ``-(nmax + 0.1 * is) / max``, is = 0, -9..9, each scored by its
    x^2-weighted least-squares fit; a trial replaces the best when it fits strictly better. Returns the
    least-squares scale [B] and the levels L + nmax [n, B] (float32; 0 for all-zero groups).
    """
    mx = _signed_absmax(x, 0)
    w = x * x
    wx = w * x
    terms = np.empty((x.shape[0], 2, x.shape[1]), dtype=np.float32)
    for i, trial in enumerate([0, *range(-9, 0), *range(1, 10)]):
        iscale = -(_F(nmax) + _F(0.1) * _F(trial)) / mx
        levels = _levels(iscale * x, -nmax, nmax - 1)
        np.multiply(wx, levels, out=terms[:, 0])
        np.multiply(w, levels, out=terms[:, 1])
        terms[:, 1] *= levels
        sumlx, suml2 = _seq_sum(terms)
        if i == 0:
            scale = np.where(suml2 != 0, sumlx / suml2, _F(0))
            best, best_iscale = scale * sumlx, iscale
            continue
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
        best_iscale = np.where(better, iscale, best_iscale)
    zero = np.abs(mx) < _GROUP_MAX_EPS
    levels = _levels(best_iscale * x, -nmax, nmax - 1) + _F(nmax)
    return np.where(zero, _F(0), scale), np.where(zero, _F(0), levels)


def _make_q3(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_q3_quants with do_rmse (the Q3_K search), x [n, B].

    Levels -nmax..nmax-1 from the scale -nmax / max, then up to 5 passes of coordinate descent that move a
    level to its x^2-weighted least-squares choice when that fits strictly better. Returns the scale [B] and
    the levels L + nmax [n, B] (float32; 0 for all-zero groups).
    """
    mx = _signed_absmax(x, 0)
    levels = _levels(_F(-nmax) / mx * x, -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = _seq_sum(wx * levels)
    suml2 = _seq_sum(w * levels * levels)
    # A pass that changes nothing leaves the state as it was, so running all 5 equals C's early exit.
    for _ in range(5):
        for i in range(x.shape[0]):
            li = levels[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new = _levels(x[i] * sl2 / slx, -nmax, nmax - 1)
            new_slx = slx + wx[i] * new
            new_sl2 = sl2 + w[i] * new * new
            better = (slx > 0) & (new != li) & (new_sl2 > 0)
            better &= new_slx * new_slx * suml2 > sumlx * sumlx * new_sl2
            levels[i] = np.where(better, new, li)
            sumlx = np.where(better, new_slx, sumlx)
            suml2 = np.where(better, new_sl2, suml2)
    zero = np.abs(mx) < _GROUP_MAX_EPS
    scale = np.where(suml2 > 0, sumlx / suml2, _F(0))
    return np.where(zero, _F(0), scale), np.where(zero, _F(0), levels + _F(nmax))


# 256-weight super-blocks ------------------------------------------------------------------------------
def _subblocks(x: np.ndarray, size: int) -> np.ndarray:
    """float32 [nb, 256] -> element-major sub-blocks [size, nb * 256 / size]."""
    return np.ascontiguousarray(x.reshape(-1, size).T)


def _from_subblocks(levels: np.ndarray, nb: int) -> np.ndarray:
    """[size, nb * 256 / size] -> [nb, 256 / size, size]."""
    return levels.T.reshape(nb, QK_K // levels.shape[0], levels.shape[0])


def _requantize(levels: np.ndarray, x: np.ndarray, dl: np.ndarray, ml: np.ndarray | None, lo: int,
                hi: int) -> np.ndarray:  # fmt: skip
    """The final levels ``nearest_int((x + ml) / dl)`` from the stored (float16-rounded) scales, as uint8.

    x, levels: [nb, sub-blocks, size]; dl, ml: [nb, sub-blocks]. Sub-blocks whose scale is 0 keep the
    search's levels (ggml's ``if (!d) continue``). The result is offset by ``-lo`` to be non-negative.
    """
    num = x if ml is None else x + ml[:, :, None]
    new = _levels(num / dl[:, :, None], lo, hi) - _F(lo)
    return np.where((dl != 0)[:, :, None], new, levels).astype(np.uint8)


def _q_q2_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xs = _subblocks(x, 16)
    scales, mins, levels = _make_qkx2(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins, levels = scales.reshape(nb, 16), mins.reshape(nb, 16), _from_subblocks(levels, nb)
    max_scale, max_min = _positive_max(scales, 1), _positive_max(mins, 1)
    # C stores the int levels into uint8 without a clamp: keep the low bits as it does.
    sc = np.where((max_scale > 0)[:, None], _nearest_int(_F(15) / max_scale[:, None] * scales) & 0xFF, 0)
    lm = (_nearest_int(_F(15) / max_min[:, None] * mins) << 4) & 0xFF
    sc = np.where((max_min > 0)[:, None], sc | lm, sc).astype(np.uint8)
    d = np.where(max_scale > 0, max_scale / _F(15), _F(0))
    dmin = np.where(max_min > 0, max_min / _F(15), _F(0))
    dl = _f16_round(d)[:, None] * (sc & 0x0F).astype(np.float32)
    ml = _f16_round(dmin)[:, None] * (sc >> 4).astype(np.float32)
    levels = _requantize(levels, x.reshape(nb, 16, 16), dl, ml, 0, 3)
    qs = _or_shifted(levels.reshape(nb, 2, 4, 32), 2, 2).reshape(nb, 64)
    return np.concatenate((sc, qs, _f16_bytes(d), _f16_bytes(dmin)), axis=1)


def _q_q3_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    scales, levels = _make_q3(_subblocks(x, 16), 4)
    scales, levels = scales.reshape(nb, 16), _from_subblocks(levels, nb)
    max_scale = _signed_absmax(scales, 1)
    iscale = _F(-32) / max_scale
    # int8_t l = nearest_int(...): the C store wraps before the clamp. An all-zero block keeps zeroed bytes.
    sc = np.clip(_nearest_int(iscale[:, None] * scales).astype(np.int8), -32, 31).astype(np.int32) + 32
    sc = np.where((max_scale != 0)[:, None], sc, 0).astype(np.uint8)
    d = np.where(max_scale != 0, _F(1) / iscale, _F(0))
    dl = _f16_round(d)[:, None] * (sc.astype(np.float32) - _F(32))
    levels = _requantize(levels, x.reshape(nb, 16, 16), dl, None, -4, 3)
    hmask = _or_shifted((levels >> 2).reshape(nb, 8, 32), 1, 1)  # bit b of byte m: weight 32 * b + m is >= 4
    qs = _or_shifted((levels & 3).reshape(nb, 2, 4, 32), 2, 2).reshape(nb, 64)
    low = sc & 0x0F
    packed = np.concatenate((low[:, :8] | (low[:, 8:] << 4), _or_shifted((sc >> 4).reshape(nb, 4, 4), 2, 1)), axis=1)
    return np.concatenate((hmask, qs, packed, _f16_bytes(d)), axis=1)


def _k_offset_search(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    """Q4_K/Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins. Returns d, dmin, the 12 scale bytes, levels."""
    nb = x.shape[0]
    xs = _subblocks(x, 32)
    weights = np.sqrt(_seq_sum(xs * xs) / _F(32)) + np.abs(xs)
    scales, mins, levels = _make_qkx2(xs, weights, nmax, rmin, 0.1, nstep, use_mad=False)
    scales, mins, levels = scales.reshape(nb, 8), mins.reshape(nb, 8), _from_subblocks(levels, nb)
    max_scale, max_min = _positive_max(scales, 1), _positive_max(mins, 1)
    inv_scale = np.where(max_scale > 0, _F(63) / max_scale, _F(0))[:, None]
    inv_min = np.where(max_min > 0, _F(63) / max_min, _F(0))[:, None]
    ls = np.minimum(_nearest_int(inv_scale * scales) & 0xFF, 63).astype(np.uint8)  # uint8_t store, then MIN(63, .)
    lm = np.minimum(_nearest_int(inv_min * mins) & 0xFF, 63).astype(np.uint8)
    d, dmin = max_scale / _F(63), max_min / _F(63)
    dl = _f16_round(d)[:, None] * ls.astype(np.float32)
    ml = _f16_round(dmin)[:, None] * lm.astype(np.float32)
    levels = _requantize(levels, x.reshape(nb, 8, 32), dl, ml, 0, nmax)
    # Scales 0-3 and mins 0-3 in bytes 0-7; the low nibbles of scales/mins 4-7 in bytes 8-11 and their
    # top two bits in the spare top bits of bytes 0-7 (get_scale_min_k4 reads them back).
    packed = np.concatenate((ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                             (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)), axis=1)  # fmt: skip
    return d, dmin, packed, levels


def _q_q4_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    d, dmin, scales, levels = _k_offset_search(x, 15, -1.0, 20)
    qs = _or_shifted(levels.reshape(nb, 4, 2, 32), 4, 2).reshape(nb, 128)
    return np.concatenate((_f16_bytes(d), _f16_bytes(dmin), scales, qs), axis=1)


def _q_q5_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    d, dmin, scales, levels = _k_offset_search(x, 31, -0.5, 15)
    qh = _or_shifted((levels >> 4).reshape(nb, 8, 32), 1, 1)
    qs = _or_shifted((levels & 0x0F).reshape(nb, 4, 2, 32), 4, 2).reshape(nb, 128)
    return np.concatenate((_f16_bytes(d), _f16_bytes(dmin), scales, qh, qs), axis=1)


def _q_q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    scales, levels = _make_qx(_subblocks(x, 16), 32)
    scales, levels = scales.reshape(nb, 16), _from_subblocks(levels, nb)
    max_scale = _signed_absmax(scales, 1)
    zero = np.abs(max_scale) < _GROUP_MAX_EPS
    iscale = _F(-128) / max_scale
    d = np.where(zero, _F(0), _F(1) / iscale)
    sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)  # the int8_t store wraps
    dl = _f16_round(d)[:, None] * sc.astype(np.float32)
    levels = _requantize(levels, x.reshape(nb, 16, 16), dl, None, -32, 31).reshape(nb, 2, 4, 32)
    low = levels & 0x0F
    ql = (low[:, :, :2] | (low[:, :, 2:] << 4)).reshape(nb, 128)
    qh = _or_shifted(levels >> 4, 2, 2).reshape(nb, 64)
    out = np.concatenate((ql, qh, sc.view(np.uint8), _f16_bytes(d)), axis=1)
    out[zero] = 0  # an all-zero block is written as zeros
    return out


_QUANTIZERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    Q.Q8_0: _q_q8_0,
    Q.Q4_0: _q_q4_0,
    Q.Q4_1: _q_q4_1,
    Q.Q5_0: _q_q5_0,
    Q.Q5_1: _q_q5_1,
    Q.Q2_K: _q_q2_k,
    Q.Q3_K: _q_q3_k,
    Q.Q4_K: _q_q4_k,
    Q.Q5_K: _q_q5_k,
    Q.Q6_K: _q_q6_k,
}

QUANTIZABLE: frozenset[GGMLQuantizationType] = frozenset(_QUANTIZERS)

# Weights per quantizer step: the K-quant searches are long chains of vector operations, so larger steps
# mean fewer of them; at 256K weights a step's temporaries (about 10 MB) still sit in the CPU caches.
_QUANT_CHUNK_WEIGHTS = 1 << 18


def _float32_numpy(t: Tensor) -> np.ndarray:
    """A float tensor's values as a float32 numpy array (on the CPU), converted without torch kernels."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.float32:
        return t.numpy()
    if t.dtype == torch.bfloat16:  # bfloat16 is the top half of a float32
        return (t.view(torch.uint16).numpy().astype(np.uint32) << 16).view(np.float32)
    if t.dtype == torch.float16:
        return t.numpy().astype(np.float32)
    return t.to(torch.float32).numpy()


def quantize(x: Tensor, qtype: GGMLQuantizationType | int) -> Tensor:
    """Quantize float weights [..., n] (n a multiple of the block size) to GGUF blocks, uint8 [..., row bytes].

    Matches ggml's reference quantizers (``quantize_row_*_ref``, which llama.cpp's ``llama_model_quantize``
    uses without an importance matrix) bit for bit. ``x`` may be float32, float16 or bfloat16 on any device;
    it is converted to float32 one chunk at a time, so memory stays bounded, and the chunks run on
    ``torch.get_num_threads()`` threads. The result is on ``x.device``.
    """
    qtype = GGMLQuantizationType(qtype)
    fn = _QUANTIZERS.get(qtype)
    if fn is None:
        available = ", ".join(t.name for t in _QUANTIZERS)
        raise NotImplementedError(f"no quantizer for GGUF type {qtype.name} (available: {available})")
    if not x.is_floating_point():
        raise TypeError(f"expected float weights, got {x.dtype}")
    block, type_size = BLOCK_SIZES[qtype]
    if x.dim() == 0 or x.shape[-1] % block:
        raise ValueError(f"{qtype.name}: row length {x.shape[-1] if x.dim() else 0} is not a multiple of {block}")
    blocks = x.detach().reshape(-1, block)
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)
    step = max(1, _QUANT_CHUNK_WEIGHTS // block)

    def run(start: int) -> None:
        with np.errstate(all="ignore"):  # C's inf/NaN intermediates (e.g. 1/0 for all-zero groups) are expected
            out[start : start + step] = fn(_float32_numpy(blocks[start : start + step]))

    starts = range(0, blocks.shape[0], step)
    workers = min(torch.get_num_threads(), len(starts))
    if workers > 1:  # numpy releases the GIL inside its loops, so the chunks run in parallel
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, starts))
    else:
        for start in starts:
            run(start)
    return torch.from_numpy(out).to(x.device).reshape(*x.shape[:-1], x.shape[-1] // block * type_size)


def quantize_weights(weight: Tensor, qtype: GGMLQuantizationType | int | str) -> Tensor:
    """A weight matrix [rows, n] as GGUF blocks, uint8 [rows, bytes_per_row]: the layout of a quantized GGUF
    tensor (what ``checkpoint.gguf.read_raw`` gives), e.g. to build a GGUF-block linear from a float checkpoint.

    ``qtype``: a GGUF type (``GGMLQuantizationType.Q4_K``, its id, or its name ``"q4_k"``); which type each
    tensor of a mix gets is ``llamaforge.gguf_mixes.tensor_type``. ``weight`` may be float32, float16 or
    bfloat16; n must be a multiple of the type's block size (32, or 256 for the K-quants). The blocks are the
    ones llama.cpp's quantizer writes (see ``quantize``); speed per type is in benchmarks/RESULTS.md.
    """
    if isinstance(qtype, str):
        try:
            qtype = GGMLQuantizationType[qtype.upper()]
        except KeyError:
            raise ValueError(f"unknown GGUF type {qtype!r}") from None
    if weight.dim() != 2:
        raise ValueError(f"expected a weight matrix [rows, n], got shape {tuple(weight.shape)}")
    return quantize(weight, qtype)
