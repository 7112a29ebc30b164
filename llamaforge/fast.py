"""Fused projections for inference: linears that share an input run as one projection.

``fuse_linears([wq, wk, wv])`` (and ``[w1, w3]``) returns one module computing the concatenated outputs.
Quantized linears of one kind (int8, int4, repacked Q8_0) are concatenated into a new module of that kind
(exact: every output row keeps its own scales). Float weights and GGUF blocks are never copied: they often
are a memory-mapped checkpoint, whose copy would hold every weight twice; their parts run side by side (the
native decode step runs all of a projection's parts in one call anyway). On CPU float parts take the native
kernels (``llamaforge.kernels``) for a few rows; 16-bit weights are multiplied in float32 for more rows
(prefill), converting a chunk of weight rows at a time. ``native_parts`` gives a fused projection's weights in
the form ``kernels.decode_step`` takes. The inference step that uses them is ``llamaforge/inference/step.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .quantize import GGUFLinear, fuse_quantized, is_quantized

_UPCAST_WEIGHTS = 1 << 22  # 16-bit weights converted to float32 at a time for a many-row product (16 MB)


class _Linear(nn.Module):
    """A plain float matmul; 16-bit weights on CPU are converted to float32 a chunk of rows at a time (torch's
    CPU GEMMs are fast in float32, and no float32 copy of the whole weight is made)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if w.device.type != "cpu" or w.dtype not in (torch.float16, torch.bfloat16):
            return F.linear(x, w)
        step = max(1, _UPCAST_WEIGHTS // w.shape[1])
        xf = x.float()
        parts = [F.linear(xf, w[i : i + step].float()) for i in range(0, w.shape[0], step)]
        return torch.cat(parts, dim=-1).to(x.dtype)


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
    """Native kernels for a few rows when built (``_FloatLinear``), torch's GEMM otherwise (``_Linear``)."""
    gemm = _Linear(weight)
    if weight.device.type == "cpu" and weight.is_contiguous():
        return _FloatLinear(weight, gemm)
    return gemm


@torch.no_grad()
def fuse_linears(linears: Sequence[nn.Module]) -> nn.Module:
    """One module computing ``cat([lin(x) for lin in linears], -1)``.

    Quantized linears of one kind (int8, int4, repacked Q8_0): a new module with the rows concatenated (see
    ``quantize.fuse_quantized``). Float linears and GGUF blocks are never copied (see ``_fusion_key``): their
    parts run side by side, as do neighbours stored differently.
    """
    runs = [list(run) for _, run in itertools.groupby(linears, key=_fusion_key)]
    fused = [_fuse_run(run) for run in runs]
    return fused[0] if len(fused) == 1 else _Concat(fused)


def _fusion_key(m: nn.Module) -> tuple:
    """Linears with equal keys can be fused into one: quantized ones of one kind. Float weights and GGUF blocks
    stay where the checkpoint has them (often memory-mapped: a fused copy would hold every weight twice)."""
    if is_quantized(m) and not isinstance(m, GGUFLinear):
        return (type(m), m.in_features, getattr(m, "group_size", None), getattr(m, "block", None), m.compute_dtype)
    return ("alone", id(m))


def _fuse_run(linears: list[nn.Module]) -> nn.Module:
    if isinstance(linears[0], nn.Linear) and linears[0].bias is None:
        return _float_kernel(linears[0].weight)
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
