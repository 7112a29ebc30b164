"""Fused projections for inference: linears that share an input run as one matmul.

``fuse_linears([wq, wk, wv])`` (and ``[w1, w3]``) returns one module computing the concatenated outputs.
For float linears the original parameters become views into the fused matrix, so no weight is stored twice
and the state dict keeps its names and values; quantized linears are concatenated into a new module of the
same kind (exact: every output row keeps its own scales). On CPU the fused modules take the native kernels
(``llamaforge.kernels``) for a few rows, and 16-bit weights use fbgemm's packed fp16 GEMM for more
(float32 activations, weights converted in registers with F16C); the packed copy is extra memory (the
model's own 16-bit weights stay, for saving and for uncached forwards). ``native_parts`` gives a fused
projection's weights in the form ``kernels.decode_step`` takes. The inference step that uses them is
``llamaforge/inference/step.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .quantize import fuse_quantized, is_quantized


def _fbgemm_fp16() -> bool:
    engines = torch.backends.quantized.supported_engines
    return "fbgemm" in engines and hasattr(torch.ops.quantized, "linear_dynamic_fp16")


class _Fp16Packed(nn.Module):
    """A float16 weight packed for fbgemm's fp16 GEMM; activations stay float32 inside."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float(), None)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x.float(), self.packed).to(x.dtype)


class _Linear(nn.Module):
    """A plain float matmul on a (possibly fused) weight."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class _FloatLinear(nn.Module):
    """Native kernel for a few rows (reading the weight as stored), ``gemm`` (torch's kernels) otherwise."""

    def __init__(self, weight: Tensor, gemm: nn.Module) -> None:
        super().__init__()
        self.weight, self.gemm = weight, gemm

    def native_weights(self) -> tuple[Tensor, None]:
        return self.weight, None

    def forward(self, x: Tensor) -> Tensor:
        if kernels.usable(x):
            return kernels.linear(x, self.weight)
        return self.gemm(x)


def _float_kernel(weight: Tensor) -> nn.Module:
    """Native kernels for a few rows when built (``_FloatLinear``), else torch's: fbgemm's fp16 GEMM for
    16-bit weights on CPU, a plain matmul otherwise.

    bfloat16 weights go there too: every bfloat16 value within float16's normal range is exact in float16
    (7 mantissa bits fit in 10), smaller ones lose at most 3e-8, and the activations stay float32, so the
    result is at least as accurate as a bfloat16 matmul. Weights beyond float16's range keep the matmul.
    """
    sixteen = weight.dtype in (torch.float16, torch.bfloat16) and weight.device.type == "cpu"
    gemm: nn.Module = _Linear(weight)
    if sixteen and _fbgemm_fp16() and (weight.dtype == torch.float16 or bool(weight.detach().abs().amax() < 65504)):
        gemm = _Fp16Packed(weight)
    if weight.device.type == "cpu" and weight.is_contiguous():
        return _FloatLinear(weight, gemm)
    return gemm


@torch.no_grad()
def fuse_linears(linears: Sequence[nn.Module]) -> nn.Module:
    """One module computing ``cat([lin(x) for lin in linears], -1)``.

    Float linears: their weights are copied into one matrix and each ``lin.weight`` becomes a view of its
    rows (same parameter object, same values, no extra memory). Quantized linears of one kind: a new
    module with the rows concatenated (see ``quantize.fuse_quantized``). Neighbours stored differently
    (q and k in 4 bits, v in float, as in GGUF Q4_K_M files) are fused in runs and the runs concatenated.
    """
    runs = [list(run) for _, run in itertools.groupby(linears, key=_fusion_key)]
    fused = [_fuse_run(run) for run in runs]
    return fused[0] if len(fused) == 1 else _Concat(fused)


def _fusion_key(m: nn.Module) -> tuple:
    """Linears with equal keys can be fused into one."""
    if isinstance(m, nn.Linear) and m.bias is None:
        return ("float",)
    if is_quantized(m):
        return (type(m), m.in_features, getattr(m, "group_size", None), getattr(m, "block", None), m.compute_dtype)
    return ("alone", id(m))


def _fuse_run(linears: list[nn.Module]) -> nn.Module:
    if isinstance(linears[0], nn.Linear) and linears[0].bias is None:
        weights = [m.weight for m in linears]
        if len(weights) == 1:
            return _float_kernel(weights[0])
        fused = torch.cat([w.detach() for w in weights], dim=0)
        start = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight.data = fused[start : start + n]
            start += n
        return _float_kernel(fused)
    return fuse_quantized(linears) if len(linears) > 1 else linears[0]


class _Concat(nn.Module):
    def __init__(self, parts: Sequence[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def native_parts(projection: nn.Module) -> list[tuple[Tensor, Tensor | None]] | None:
    """The (weight, scales) pairs of a projection's parts as ``kernels.decode_step`` takes them, or None
    when one of them has no native form (e.g. a float weight on another device)."""
    modules = list(projection.parts) if isinstance(projection, _Concat) else [projection]
    native = [m.native_weights() if hasattr(m, "native_weights") else None for m in modules]
    return None if any(n is None for n in native) else native  # type: ignore[return-value]
