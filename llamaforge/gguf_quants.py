"""GGUF (ggml) block formats in torch: vectorized dequantizers and the simple quantizers.

A quantized row of ``n`` weights is stored as ``n / block_size`` blocks of ``type_size`` bytes
(``BLOCK_SIZES``). Every function here works on uint8 tensors whose last dimension holds whole blocks,
so a GGUF matrix stored as ``[rows, bytes_per_row]`` dequantizes to ``[rows, n]``. The arithmetic
follows ggml's reference code operation for operation, in float32, so results are bit-identical to
``gguf.quants.dequantize`` (the tests compare them).

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
def _round_away(x: Tensor) -> Tensor:
    """C's roundf (halves away from zero), computed without the x + 0.5 rounding error."""
    a = x.abs()
    fl = a.floor()
    return torch.sign(x) * (fl + (2 * (a - fl)).floor())


def _f16_bytes(x: Tensor) -> Tensor:
    return x.to(torch.float16).view(torch.uint8).reshape(x.shape[0], 2)


def _safe_inverse(d: Tensor) -> Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _pack_nibbles(q: Tensor) -> Tensor:
    """uint8 [n, 32] of values 0..15 -> [n, 16]: weight j in the low nibble, weight j + 16 in the high one."""
    return q[:, :16] | (q[:, 16:] << 4)


def _q_q8_0(x: Tensor) -> Tensor:
    d = x.abs().amax(dim=1, keepdim=True) / 127
    q = _round_away(x * _safe_inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat((_f16_bytes(d), q), dim=1)


def _q_q4_0(x: Tensor) -> Tensor:
    # The scale maps the weight of largest magnitude, with its sign, to -8.
    imax = x.abs().argmax(dim=1, keepdim=True)
    d = torch.gather(x, 1, imax) / -8
    q = torch.trunc(x * _safe_inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return torch.cat((_f16_bytes(d), _pack_nibbles(q)), dim=1)


def _q_q4_1(x: Tensor) -> Tensor:
    lo = x.amin(dim=1, keepdim=True)
    d = (x.amax(dim=1, keepdim=True) - lo) / 15
    q = torch.trunc((x - lo) * _safe_inverse(d) + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat((_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)), dim=1)


_QUANTIZERS: dict[GGMLQuantizationType, Callable[[Tensor], Tensor]] = {
    Q.Q8_0: _q_q8_0,
    Q.Q4_0: _q_q4_0,
    Q.Q4_1: _q_q4_1,
}

QUANTIZABLE: frozenset[GGMLQuantizationType] = frozenset(_QUANTIZERS)


def quantize(x: Tensor, qtype: GGMLQuantizationType | int) -> Tensor:
    """Quantize float weights [..., n] (n a multiple of 32) to GGUF blocks, uint8 [..., n / 32 * type_size].

    Matches ggml's reference quantizers (``quantize_row_*_ref``) bit for bit.
    """
    qtype = GGMLQuantizationType(qtype)
    fn = _QUANTIZERS.get(qtype)
    if fn is None:
        raise NotImplementedError(f"no quantizer for GGUF type {qtype.name} (available: Q8_0, Q4_0, Q4_1)")
    block, type_size = BLOCK_SIZES[qtype]
    if x.dim() == 0 or x.shape[-1] % block:
        raise ValueError(f"{qtype.name}: row length {x.shape[-1] if x.dim() else 0} is not a multiple of {block}")
    blocks = x.detach().to(torch.float32).reshape(-1, block)
    out = torch.empty((blocks.shape[0], type_size), dtype=torch.uint8, device=x.device)
    step = max(1, _CHUNK_WEIGHTS // block)
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = fn(blocks[start : start + step])
    return out.reshape(*x.shape[:-1], x.shape[-1] // block * type_size)
