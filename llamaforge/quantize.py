"""Weight-only quantization: ``nn.Linear`` layers swapped for modules that keep int8 or int4 weights.

Schemes (``quantize_model(model, scheme)``, in place):

- ``"int8"``: symmetric per-output-channel int8, ``w = q * scale`` (``torch.ops.aten._weight_int8pack_mm``).
- ``"int4"`` / ``"int4-g32"`` / ``"int4-g64"`` / ``"int4-g128"``: asymmetric 4-bit with one (scale, zero)
  per group of 32/64/128 input weights, in the convention of torch's int4 kernels:
  ``w = (q - 8) * scale + zero`` with ``q`` in 0..15 (``_weight_int4pack_mm_for_cpu`` on CPU,
  ``_weight_int4pack_mm`` on CUDA).

Every attention and feed-forward linear and the output head are quantized; embeddings, norms and a mixture of
experts' router stay float. A tied output head is quantized as its own copy, so the embedding table is untouched.
Llama 4's stacked experts (``model.GroupedExperts``) become ``QuantizedExperts``: each expert's three matrices as
quantized linears, so the MoE layer, which groups the tokens routed to each expert, runs one quantized matmul per
active expert and projection.

GGUF weights run quantized without becoming float32 matrices (``load_gguf_quantized``): Q4_0, Q4_1 and
Q4_K map exactly onto the int4 kernel's group-32 (scale, zero) format (Q4_1's ``d * q + m`` is
``(q - 8) * d + (m + 8 d)``); Q8_0 (one scale per 32 weights) becomes a ``BlockInt8Linear`` that runs
the int8 kernel once per 32-column block with that block's per-row scales.

On CPU, torch's int8/int4 kernels are vectorized only for bfloat16 activations (float32 inputs take a
scalar path about 10x slower, float16 worse), so float32 activations are rounded to bfloat16 for these
matmuls (``compute_dtype``); for prompts of ``PREFILL_ROWS`` tokens or more the weight is dequantized
and multiplied with the regular float GEMM, which is faster there than the weight-only kernels.
When the native kernels are built (``llamaforge.kernels``) and no ``compute_dtype`` is set, inputs of up
to ``kernels.MAX_ROWS`` rows on CPU go to them instead: they read these modules' buffers as stored and
accumulate in float32 (activations rounded to int16 per 32 columns, relative error ~1e-5).

Saved form (``save_quantized``): ``model.safetensors`` with the quantized modules' buffers under the
model's own names (``layers.0.attention.wq.qweight``, ``...scales``) plus the float tensors, and
``quantization.json`` with the config and each quantized module's kind; ``load_quantized`` reads both.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .config import ModelConfig, RopeScaling
from .model import Transformer

INT4_GROUP_SIZES = (32, 64, 128, 256)
SCHEMES = ("int8", "int4", "int4-g32", "int4-g64", "int4-g128")
DEFAULT_INT4_GROUP = 32
PREFILL_ROWS = 32  # at or above this many rows, dequantize and use the float GEMM
QUANT_FORMAT_VERSION = 1
META_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"

# Linear layers that quantize_model swaps (matched against module names).
_LINEAR_NAMES = re.compile(r"(^|\.)(wq|wk|wv|wo|w1|w2|w3|output)$")


def gguf_schemes() -> tuple[str, ...]:
    """GGUF schemes an in-memory model can be quantized to: llama.cpp's mixes ("q4_k_m", "q8_0", ...: each matrix
    the type llama.cpp's quantizer gives it) and single block types ("q4_k": every matrix that type)."""
    from .gguf_mixes import MIXES
    from .gguf_quants import QUANTIZABLE

    types = {t.name.lower() for t in QUANTIZABLE if t.name in GGUF_BLOCK_TYPES}
    return tuple(sorted(set(MIXES) | types))


def parse_scheme(scheme: str, group_size: int | None = None) -> tuple[str, int | None]:
    """("int8", None), ("int4", group) from a scheme name such as "int4-g64", ("gguf-mix", None) for one of
    llama.cpp's mixes ("q4_k_m", "q8_0", ...) or ("gguf", ggml type) for a block type ("q4_k"); clear errors
    otherwise."""
    s = scheme.lower().strip()
    if s in gguf_schemes():
        from gguf import GGMLQuantizationType

        from .gguf_mixes import MIXES

        if group_size is not None:
            raise ValueError(f"{scheme} has its own block size; group_size applies only to int4")
        return ("gguf-mix", None) if s in MIXES else ("gguf", int(GGMLQuantizationType[s.upper()]))
    if s == "int8":
        if group_size is not None:
            raise ValueError("int8 quantization is per output channel; group_size applies only to int4")
        return "int8", None
    m = re.fullmatch(r"int4(?:-g(\d+))?", s)
    if m is None:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of "
                         f"{', '.join(SCHEMES + gguf_schemes())}")  # fmt: skip
    named = int(m.group(1)) if m.group(1) else None
    if named is not None and group_size is not None and named != group_size:
        raise ValueError(f"scheme {scheme!r} names group size {named} but group_size={group_size} was given")
    group = named or group_size or DEFAULT_INT4_GROUP
    if group not in INT4_GROUP_SIZES:
        raise ValueError(f"unsupported int4 group size {group}; torch's int4 kernels take {INT4_GROUP_SIZES}")
    return "int4", group


def _compute_dtype(x: Tensor, requested: torch.dtype | None) -> torch.dtype:
    if requested is not None:
        return requested
    if x.device.type == "cpu" or x.device.type == "cuda":
        # CPU: only the bfloat16 paths are vectorized; CUDA's int4 kernel takes bfloat16 only.
        return torch.bfloat16 if x.dtype == torch.float32 or x.device.type == "cuda" else x.dtype
    return x.dtype


class _QuantLinear(nn.Module):
    """Shared plumbing: shapes, the dtype used for the kernel, and the large-batch dequantize path."""

    kind = ""

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype  # None: bfloat16 for float32 inputs (see module docstring)
        self._cache: dict[Any, Any] = {}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def _apply(self, fn, recurse=True):  # moving or casting invalidates kernel-format caches
        self._cache = {}
        return super()._apply(fn, recurse)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        raise NotImplementedError

    def _kernel(self, x2: Tensor, dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    def native_weights(self) -> tuple[Tensor, Tensor] | None:
        """(weight, scales) as ``kernels.linear`` takes them, or None when the native kernels do not apply
        (a compute dtype was asked for, or a layout they lack)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, expected {self.in_features}")
        if x.requires_grad and torch.is_grad_enabled():
            # The native and torch int kernels have no backward: a gradient wanted through this layer (LoRA /
            # QLoRA on a quantized base) takes the dequantized matmul, which autograd differentiates.
            return F.linear(x, self.dequantize(x.dtype))
        if x.is_floating_point() and kernels.usable(x) and (native := self.native_weights()) is not None:
            return kernels.linear(x, *native)
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] >= PREFILL_ROWS and x.is_floating_point() and x.device.type == "cpu":
            return F.linear(x, self.dequantize(x.dtype))
        dtype = _compute_dtype(x, self.compute_dtype)
        y = self._kernel(x2.to(dtype), dtype)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


class Int8Linear(_QuantLinear):
    """Per-output-channel symmetric int8 weights: ``w[n, k] = qweight[n, k] * scales[n]``."""

    kind = "int8"

    def __init__(self, in_features: int, out_features: int, device=None, compute_dtype=None) -> None:
        super().__init__(in_features, out_features, compute_dtype)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_float(cls, weight: Tensor, compute_dtype: torch.dtype | None = None) -> Int8Linear:
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
        q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        mod = cls(w.shape[1], w.shape[0], device=w.device, compute_dtype=compute_dtype)
        mod.qweight.copy_(q)
        mod.scales.copy_(scales)
        return mod

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.qweight.to(dtype) * self.scales.to(dtype)[:, None]).to(dtype)

    def _kernel(self, x2: Tensor, dtype: torch.dtype) -> Tensor:
        scales = self._cache.get(dtype)
        if scales is None:
            scales = self._cache[dtype] = self.scales.to(dtype)
        if x2.device.type == "cuda":  # in this form torch.compile fuses the int8 -> bf16 conversion into the matmul
            return F.linear(x2, self.qweight.to(dtype)) * scales
        return torch.ops.aten._weight_int8pack_mm(x2, self.qweight, scales)

    def native_weights(self) -> tuple[Tensor, Tensor] | None:
        return None if self.compute_dtype is not None else (self.qweight, self.scales)


def check_int4_shape(in_features: int, out_features: int, group_size: int, name: str = "") -> None:
    """Raise a ValueError naming the layer when torch's int4 kernels cannot take this shape."""
    where = f"{name}: " if name else ""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"{where}unsupported int4 group size {group_size}; choose one of {INT4_GROUP_SIZES}")
    if in_features % group_size:
        fits = [g for g in INT4_GROUP_SIZES if in_features % g == 0]
        hint = f"; group sizes that fit: {fits}" if fits else ""
        raise ValueError(
            f"{where}in_features {in_features} is not a multiple of the int4 group size {group_size}{hint}"
        )
    if out_features % 16:
        raise ValueError(f"{where}out_features {out_features} is not a multiple of 16, as torch's int4 kernels need")


class Int4Linear(_QuantLinear):
    """Group-wise 4-bit weights, ``w = (q - 8) * scale + zero`` per group of ``group_size`` inputs.

    ``qweight`` uint8 [N, K/2] holds column 2j in the low nibble and 2j+1 in the high nibble (a portable
    layout; the device-specific kernel packing is built on first use and cached), ``scales_and_zeros``
    float32 [K/group, N, 2] is the kernel's own (scale, zero) layout.
    """

    kind = "int4"

    def __init__(self, in_features: int, out_features: int, group_size: int = DEFAULT_INT4_GROUP, device=None,
                 compute_dtype=None) -> None:  # fmt: skip
        check_int4_shape(in_features, out_features, group_size)
        super().__init__(in_features, out_features, compute_dtype)
        self.group_size = group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        sz = torch.zeros(in_features // group_size, out_features, 2, dtype=torch.float32, device=device)
        self.register_buffer("scales_and_zeros", sz)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"

    @classmethod
    def from_codes(cls, q: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                   compute_dtype: torch.dtype | None = None) -> Int4Linear:  # fmt: skip
        """From codes q [N, K] in 0..15 and per-group scales/zeros [N, K/group]: w = (q - 8) * scale + zero."""
        n, k = q.shape
        mod = cls(k, n, group_size, device=q.device, compute_dtype=compute_dtype)
        q = q.to(torch.uint8)
        mod.qweight.copy_(q[:, 0::2] | (q[:, 1::2] << 4))
        mod.scales_and_zeros.copy_(torch.stack((scales.float().t(), zeros.float().t()), dim=-1))
        return mod

    @classmethod
    def from_float(cls, weight: Tensor, group_size: int = DEFAULT_INT4_GROUP,
                   compute_dtype: torch.dtype | None = None) -> Int4Linear:  # fmt: skip
        w = weight.detach().float()
        n, k = w.shape
        check_int4_shape(k, n, group_size)
        g = w.view(n, k // group_size, group_size)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scales = ((hi - lo) / 15.0).clamp(min=1e-10)
        q = torch.round((g - lo[..., None]) / scales[..., None]).clamp_(0, 15).view(n, k)
        return cls.from_codes(q, scales, lo + 8.0 * scales, group_size, compute_dtype)

    def codes(self) -> Tensor:
        """The 4-bit codes as uint8 [N, K]."""
        q = self.qweight
        return torch.stack((q & 0x0F, q >> 4), dim=-1).view(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        n, k, g = self.out_features, self.in_features, self.group_size
        sz = self.scales_and_zeros
        scales, zeros = sz[..., 0].t().unsqueeze(-1), sz[..., 1].t().unsqueeze(-1)  # [N, K/g, 1]
        q = self.codes().view(n, k // g, g).float()
        return ((q - 8.0) * scales + zeros).view(n, k).to(dtype)

    def _kernel(self, x2: Tensor, dtype: torch.dtype) -> Tensor:
        key = (x2.device, dtype)
        entry = self._cache.get(key)
        if entry is None:
            entry = self._cache[key] = self._pack(x2.device, dtype)
        packed, sz = entry
        if x2.device.type == "cuda":
            return torch.ops.aten._weight_int4pack_mm(x2, packed, self.group_size, sz)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz)

    def _pack(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        q = self.codes()
        if device.type == "cuda":  # the CUDA kernel takes bytes with the even column in the high nibble
            hi_lo = (q[:, 0::2] << 4) | q[:, 1::2]
            tiles = next(t for t in (8, 4, 2) if (q.shape[1] // 16) % t == 0)  # K=576 (SmolLM2) takes 4
            packed = torch.ops.aten._convert_weight_to_int4pack(hi_lo.contiguous(), tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        return packed, self.scales_and_zeros.to(dtype).contiguous()

    def native_weights(self) -> tuple[Tensor, Tensor] | None:
        if self.compute_dtype is not None:
            return None
        scale_bias = self._cache.get("native")
        if scale_bias is None:  # each row's scales and biases contiguous (a copy the size of scales_and_zeros)
            scale_bias = self._cache["native"] = kernels.int4_scale_bias(self.scales_and_zeros)
        return self.qweight, scale_bias


class BlockInt8Linear(_QuantLinear):
    """GGUF Q8_0: int8 weights with one scale per row and block of ``block`` (32) inputs.

    ``qweight`` int8 [K/block, N, block] and ``scales`` float32 [K/block, N]: block b of row n is
    ``qweight[b, n] * scales[b, n]``. The product runs the per-channel int8 kernel once per block.
    """

    kind = "block_int8"

    def __init__(self, in_features: int, out_features: int, block: int = 32, device=None, compute_dtype=None) -> None:
        if in_features % block:
            raise ValueError(f"in_features {in_features} is not a multiple of the block size {block}")
        super().__init__(in_features, out_features, compute_dtype)
        self.block = block
        nb = in_features // block
        self.register_buffer("qweight", torch.zeros(nb, out_features, block, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(nb, out_features, dtype=torch.float32, device=device))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block={self.block}"

    @classmethod
    def from_blocks(cls, q: Tensor, scales: Tensor, compute_dtype: torch.dtype | None = None) -> BlockInt8Linear:
        """From int8 q [N, K] and scales [N, K/block]."""
        n, k = q.shape
        block = k // scales.shape[1]
        mod = cls(k, n, block, device=q.device, compute_dtype=compute_dtype)
        mod.qweight.copy_(q.view(n, k // block, block).transpose(0, 1))
        mod.scales.copy_(scales.float().t())
        return mod

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        w = self.qweight.float() * self.scales.unsqueeze(-1)  # [K/b, N, b]
        return w.transpose(0, 1).reshape(self.out_features, self.in_features).to(dtype)

    def _kernel(self, x2: Tensor, dtype: torch.dtype) -> Tensor:
        scales = self._cache.get(dtype)
        if scales is None:
            scales = self._cache[dtype] = self.scales.to(dtype)
        blocks = x2.view(x2.shape[0], -1, self.block)
        out = None
        for b in range(self.qweight.shape[0]):  # accumulate in float32: one rounding per block, not per sum
            part = torch.ops.aten._weight_int8pack_mm(blocks[:, b], self.qweight[b], scales[b]).float()
            out = part if out is None else out.add_(part)
        assert out is not None
        return out

    def native_weights(self) -> tuple[Tensor, Tensor] | None:
        if self.compute_dtype is not None or self.block != 32:  # GGUF's Q8_0 block, the one the kernel takes
            return None
        return self.qweight, self.scales


QUANT_MODULES: dict[str, type[_QuantLinear]] = {m.kind: m for m in (Int8Linear, Int4Linear, BlockInt8Linear)}


class QuantizedExperts(nn.Module):
    """``model.GroupedExperts`` with each expert's matrices as linear modules (quantized, or ``nn.Linear`` where a
    file keeps one in floats): ``w1[e]``, ``w3[e]`` map dim -> hidden, ``w2[e]`` hidden -> dim. ``experts(e, x)`` is
    the SwiGLU of expert ``e`` on the rows ``x`` routed to it."""

    def __init__(self, w1: list[nn.Module], w2: list[nn.Module], w3: list[nn.Module]) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = nn.ModuleList(w1), nn.ModuleList(w2), nn.ModuleList(w3)

    def forward(self, e: int, x: Tensor) -> Tensor:
        return self.w2[e](F.silu(self.w1[e](x)) * self.w3[e](x))

    @staticmethod
    def expert_matrices(experts: nn.Module) -> dict[str, list[Tensor]]:
        """A ``GroupedExperts``' matrices as linear weights [out, in] per expert (views of Meta's [E, in, out])."""
        return {n: list(getattr(experts, n).detach().transpose(1, 2).unbind(0)) for n in ("w1", "w2", "w3")}


def _expert_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .model import GroupedExperts

    return [(name, m) for name, m in model.named_modules() if isinstance(m, GroupedExperts)]


# Whole models ------------------------------------------------------------------------------------------
def _target_linears(model: nn.Module) -> Iterable[tuple[str, nn.Linear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and _LINEAR_NAMES.search(name):
            yield name, mod


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


@torch.no_grad()
def quantize_model(model: Transformer, scheme: str = "int8", group_size: int | None = None,
                   compute_dtype: torch.dtype | None = None) -> Transformer:  # fmt: skip
    """Swap the attention/FFN linears and the output head for quantized modules, in place: int8 or int4 (torch's
    kernels' layouts), or GGUF blocks as ``GGUFLinear`` (the kernels llamaforge runs GGUF files with): one of
    llama.cpp's mixes ("q4_k_m", "q8_0", ...: each matrix gets the type llama.cpp's quantizer gives it, so the
    model equals `convert --quantize` of the same checkpoint) or one block type for every matrix ("q4_k"; a
    matrix whose rows do not fill its blocks takes Q8_0).

    Shapes are checked for every layer before anything changes, so a failure leaves the model intact.
    A tied output head is quantized as its own copy (the embedding table stays float).
    """
    from tqdm import tqdm

    kind, group = parse_scheme(scheme, group_size)
    targets = [(name, lin.weight) for name, lin in _target_linears(model)]
    expert_layers = _expert_layers(model)
    for layer, experts in expert_layers:  # each expert's matrix as a linear weight [out, in]
        for part, weights in QuantizedExperts.expert_matrices(experts).items():
            targets += [(f"{layer}.{part}.{e}", w) for e, w in enumerate(weights)]
    if kind == "int4":
        for name, w in targets:
            check_int4_shape(w.shape[1], w.shape[0], group, name)  # type: ignore[arg-type]
    if kind.startswith("gguf"):
        types = {name: _gguf_type(model, scheme, kind, group, name, w) for name, w in targets}
    pending: dict[str, nn.Module] = {}  # one layer's quantized experts, until the layer is complete
    sizes = {layer: 3 * experts.w1.shape[0] for layer, experts in expert_layers}
    for name, w in tqdm(targets, desc=f"quantizing to {scheme}", unit="matrix", disable=None, leave=False):
        expert = ".experts." in f".{name}"
        if kind == "int8":
            new: nn.Module = Int8Linear.from_float(w, compute_dtype)
        elif kind == "int4":
            new = Int4Linear.from_float(w, group, compute_dtype)  # type: ignore[arg-type]
        elif types[name] is None:  # rows that fill no GGUF block: the matrix stays float, as llama.cpp keeps it F16
            new = _float_linear(w) if expert else model.get_submodule(name)
        else:
            new = GGUFLinear.from_float(w, types[name])
        if not expert:
            _set_module(model, name, new)
            continue
        pending[name] = new
        layer = name.rsplit(".", 2)[0]
        if len(pending) == sizes[layer]:
            n = sizes[layer] // 3
            parts = {p: [pending.pop(f"{layer}.{p}.{e}") for e in range(n)] for p in ("w1", "w2", "w3")}
            _set_module(model, layer, QuantizedExperts(**parts))
    named = scheme.lower() if kind.startswith("gguf") else kind
    model.quantization = {"scheme": named, "group_size": group if kind == "int4" else None}  # type: ignore[assignment]
    return model


def _gguf_type(model: Transformer, scheme: str, kind: str, qtype: int | None, name: str, w: Tensor) -> int | None:
    """The GGUF type `scheme` gives the matrix `name` [out, in] (None: it stays float). An expert's matrix
    (``...experts.w2.3``) takes the type of its layer's stacked expert tensor."""
    if kind == "gguf":
        return _block_type(qtype, w.shape[1], name)  # type: ignore[arg-type]
    from gguf import GGMLQuantizationType as Q

    from .gguf_mixes import tensor_type

    tensor = name.rpartition(".")[0] if ".experts." in f".{name}" else f"{name}.weight"
    chosen = tensor_type(model.config, tensor, tuple(w.shape), scheme.lower())
    return None if chosen in (Q.F16, Q.F32, Q.BF16) else int(chosen)


def _float_linear(weight: Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding `weight` [out, in] (a view: no copy)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return lin


def _block_type(qtype: int, in_features: int, name: str) -> int:
    """The GGUF type a matrix takes: `qtype`, or Q8_0 when its rows do not fill `qtype`'s blocks."""
    from gguf import GGMLQuantizationType as Q

    from .gguf_quants import BLOCK_SIZES

    if in_features % BLOCK_SIZES[Q(qtype)][0] == 0:
        return qtype
    if in_features % 32 == 0:
        return int(Q.Q8_0)
    raise ValueError(f"{name}: in_features {in_features} is not a multiple of 32, the smallest GGUF block")


def quantized_modules(model: nn.Module) -> dict[str, _QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _QuantLinear)}


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, _QuantLinear)


def kv_cache_dtype(model: nn.Module) -> torch.dtype | None:
    """The KV-cache dtype generation uses for ``model``: float16 for a float32 model with quantized linears
    (as llama.cpp keeps its cache), None (the model's own dtype) otherwise.

    Decoding reads the whole cache every step: at 600 tokens of context SmolLM2's float32 cache is 26 MB
    per token, a third of its 4-bit weights. float16 halves that traffic and the cache's memory, and its
    rounding (5e-4 relative) is far below what the quantized weights already change.
    """
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    quantized = any(is_quantized(m) for m in model.modules())
    return torch.float16 if quantized and ref is not None and ref.dtype == torch.float32 else None


@torch.no_grad()
def fuse_quantized(mods: list[_QuantLinear]) -> _QuantLinear:
    """One module of the same kind whose output rows are those of `mods` in order (they share the input).

    Exact: every output row keeps its own codes and scales. Raises ValueError when the modules differ in
    kind, input width, group or block size.
    """
    first = mods[0]
    kind, k = type(first), first.in_features
    if any(type(m) is not kind or m.in_features != k for m in mods):
        raise ValueError("only quantized linears of one kind and input width can be fused")
    n = sum(m.out_features for m in mods)
    dev = first.qweight.device
    if isinstance(first, Int4Linear):
        if any(m.group_size != first.group_size for m in mods):
            raise ValueError("int4 linears with different group sizes cannot be fused")
        out: _QuantLinear = Int4Linear(k, n, first.group_size, device=dev, compute_dtype=first.compute_dtype)
        out.scales_and_zeros.copy_(torch.cat([m.scales_and_zeros for m in mods], dim=1))
        out.qweight.copy_(torch.cat([m.qweight for m in mods], dim=0))
    elif isinstance(first, BlockInt8Linear):
        if any(m.block != first.block for m in mods):
            raise ValueError("Q8_0 linears with different block sizes cannot be fused")
        out = BlockInt8Linear(k, n, first.block, device=dev, compute_dtype=first.compute_dtype)
        out.qweight.copy_(torch.cat([m.qweight for m in mods], dim=1))
        out.scales.copy_(torch.cat([m.scales for m in mods], dim=1))
    else:
        out = Int8Linear(k, n, device=dev, compute_dtype=first.compute_dtype)
        out.qweight.copy_(torch.cat([m.qweight for m in mods], dim=0))
        out.scales.copy_(torch.cat([m.scales for m in mods], dim=0))
    return out


# GGUF blocks, run as stored ---------------------------------------------------------------------------------
# Types whose blocks the native kernels multiply as stored (llamaforge/kernels/blocks.cpp).
GGUF_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
_CHUNK_WEIGHTS = 1 << 24  # weights dequantized at a time where no native kernel applies (64 MB of float32)


class GGUFLinear(_QuantLinear):
    """A weight matrix kept in a GGUF file's own blocks (``blocks`` uint8 [N, bytes per row], usually a view of the
    memory-mapped file) and multiplied as stored by the native kernels, activations rounded to 8 bits per block
    as llama.cpp does. Without them (another device, no compiler) it is dequantized a chunk of rows at a time, so
    no float copy of the whole matrix ever exists. Under autograd the input gets its gradient (the weights are
    frozen), e.g. for LoRA on a GGUF base."""

    kind = "gguf"

    def __init__(self, in_features: int, out_features: int, qtype: Any, blocks: Tensor | None = None,
                 device=None) -> None:  # fmt: skip
        from gguf import GGMLQuantizationType

        from .gguf_quants import BLOCK_SIZES

        super().__init__(in_features, out_features)
        try:
            self.qtype = GGMLQuantizationType[qtype] if isinstance(qtype, str) else GGMLQuantizationType(qtype)
        except (KeyError, ValueError):
            raise ValueError(f"unknown GGUF type {qtype!r}") from None
        block, size = BLOCK_SIZES[self.qtype]
        if in_features % block:
            raise ValueError(f"{self.qtype.name}: in_features {in_features} is not a multiple of its block of {block}")
        shape = (out_features, in_features // block * size)
        if blocks is None:
            blocks = torch.zeros(shape, dtype=torch.uint8, device=device)
        elif blocks.dtype != torch.uint8 or tuple(blocks.shape) != shape:
            raise ValueError(f"{self.qtype.name} blocks for [{out_features}, {in_features}] must be uint8 "
                             f"{list(shape)}, got {blocks.dtype} {list(blocks.shape)}")  # fmt: skip
        self.register_buffer("blocks", blocks)
        self._info = kernels.gguf_info(int(self.qtype), in_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qtype={self.qtype.name}"

    @classmethod
    def from_float(cls, weight: Tensor, qtype: Any) -> GGUFLinear:
        """Quantize a float weight [N, K] to GGUF blocks (ggml's reference quantizers, ``gguf_quants.quantize``)."""
        from .gguf_quants import quantize

        w = weight.detach()
        return cls(w.shape[1], w.shape[0], qtype, quantize(w, qtype).to(w.device))

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | None = None) -> Tensor:
        from .gguf_quants import dequantize

        blocks = self.blocks if rows is None else self.blocks[rows]
        return dequantize(blocks, self.qtype, (blocks.shape[0], self.in_features)).to(dtype)

    def native_weights(self) -> tuple[Tensor, Tensor] | None:
        native = self.qtype.name in GGUF_BLOCK_TYPES and self.blocks.device.type == "cpu"
        return (self.blocks, self._info) if native else None

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"GGUFLinear: input has {x.shape[-1]} features, expected {self.in_features}")
        if torch.is_grad_enabled() and x.requires_grad:
            return _BlocksMatmul.apply(x, self)
        return self.matmul(x)

    def matmul(self, x: Tensor) -> Tensor:
        """``x @ W.T`` without autograd."""
        if x.is_floating_point() and x.device.type == "cpu" and self.native_weights() and kernels.available():
            return kernels.linear(x, self.blocks, self._info)
        step = max(1, _CHUNK_WEIGHTS // self.in_features)
        parts = [F.linear(x, self.dequantize(x.dtype, slice(i, i + step))) for i in range(0, self.out_features, step)]
        return torch.cat(parts, dim=-1)

    def grad_input(self, grad: Tensor) -> Tensor:
        """``grad @ W``, a chunk of the weight's rows at a time."""
        step = max(1, _CHUNK_WEIGHTS // self.in_features)
        out = None
        for i in range(0, self.out_features, step):
            part = grad[..., i : i + step] @ self.dequantize(grad.dtype, slice(i, i + step))
            out = part if out is None else out + part
        assert out is not None
        return out


QUANT_MODULES[GGUFLinear.kind] = GGUFLinear


class _BlocksMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, module: GGUFLinear) -> Tensor:  # type: ignore[override]
        ctx.module = module
        return module.matmul(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.module.grad_input(grad), None


class GGUFEmbedding(nn.Module):
    """An embedding table kept in GGUF blocks: a lookup dequantizes only the rows it needs. ``weight`` is the
    blocks tensor (for callers that ask where the table lives); a tied output head shares it as a ``GGUFLinear``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: Any, blocks: Tensor,
                 dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        super().__init__()
        self.table = GGUFLinear(embedding_dim, num_embeddings, qtype, blocks)  # the same checks, one copy
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype

    @property
    def weight(self) -> Tensor:
        return self.table.blocks

    @property
    def qtype(self) -> Any:
        return self.table.qtype

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype.name}"

    def forward(self, tokens: Tensor) -> Tensor:
        from .gguf_quants import dequantize

        rows = self.table.blocks[tokens.reshape(-1)]
        out = dequantize(rows, self.qtype, (rows.shape[0], self.embedding_dim))
        return out.view(*tokens.shape, self.embedding_dim).to(self.dtype)


def _f16(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float16).float()


def _k_scale_min(s: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K's 12 bytes of packed 6-bit scales and mins -> (scales, mins) uint8 [n, 8]."""
    s = s.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def gguf_codes(data: Tensor, qtype: Any, shape: tuple[int, int]) -> tuple[str, Tensor, Tensor, Tensor | None]:
    """Decode GGUF blocks [N, bytes_per_row] of a 2-D weight into the codes of torch's int4/int8 kernels.

    Returns ("int4", q [N, K] in 0..15, scales [N, K/32], zeros [N, K/32]) for Q4_0/Q4_1/Q4_K, in the
    int4 kernel's convention ``w = (q - 8) * scale + zero``, or ("block_int8", q int8 [N, K], scales
    [N, K/32], None) for Q8_0. Raises ValueError for other types. (GPUs run GGUF files through these modules.)
    """
    from gguf import GGMLQuantizationType as Q

    qtype = Q(qtype)
    n, k = shape
    b = data.reshape(n, -1)
    if qtype == Q.Q8_0:
        blk = b.view(n, k // 32, 34)
        return "block_int8", blk[..., 2:].contiguous().view(torch.int8).view(n, k), _f16(blk[..., :2])[..., 0], None
    if qtype in (Q.Q4_0, Q.Q4_1):
        size = 18 if qtype == Q.Q4_0 else 20
        blk = b.view(n, k // 32, size)
        qs = blk[..., size - 16 :]
        q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).view(n, k)  # low nibbles are weights 0..15
        d = _f16(blk[..., :2])[..., 0]
        if qtype == Q.Q4_0:  # w = d * (q - 8)
            return "int4", q, d, torch.zeros_like(d)
        m = _f16(blk[..., 2:4])[..., 0]  # w = d * q + m = (q - 8) * d + (m + 8 d)
        return "int4", q, d, m + 8.0 * d
    if qtype == Q.Q4_K:
        blk = b.view(n * (k // 256), 144)
        d, dmin = _f16(blk[:, :2]), _f16(blk[:, 2:4])
        sc, mn = _k_scale_min(blk[:, 4:16])
        scales = (d * sc.float()).view(n, k // 32)
        mins = (dmin * mn.float()).view(n, k // 32)
        qs = blk[:, 16:].reshape(-1, 4, 32)  # each 32 bytes: 32 low nibbles, then 32 high nibbles
        q = torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(n, k)
        return "int4", q, scales, 8.0 * scales - mins  # w = scale * q - min
    raise ValueError(f"GGUF type {qtype.name} has no int4/int8 form; supported: Q8_0, Q4_0, Q4_1, Q4_K")


GGUF_REPACK_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K")


def gguf_linear(
    data: Tensor, qtype: Any, shape: tuple[int, int], compute_dtype: torch.dtype | None = None
) -> _QuantLinear:
    """A linear module holding a GGUF matrix's weights in torch's int4/int8 kernel layouts (see ``gguf_codes``)."""
    kind, q, scales, zeros = gguf_codes(data, qtype, shape)
    if kind == "block_int8":
        return BlockInt8Linear.from_blocks(q, scales, compute_dtype)
    assert zeros is not None
    return Int4Linear.from_codes(q, scales, zeros, 32, compute_dtype)


def _gguf_module(data: Tensor, qtype: Any, shape: tuple[int, ...], device: torch.device) -> nn.Module:
    """A GGUF matrix [out, in] in blocks as the module that runs it on `device`: its own blocks on the CPU, torch's
    int4/int8 layouts on a GPU where they exist (``gguf_linear``)."""
    if device.type == "cpu":
        return GGUFLinear(shape[1], shape[0], qtype, data)
    if qtype.name in GGUF_REPACK_TYPES:
        return gguf_linear(data, qtype, tuple(shape)).to(device)
    return GGUFLinear(shape[1], shape[0], qtype, data.to(device))


def gguf_model_bytes(path: str | os.PathLike, dtype: torch.dtype | None = None) -> int:
    """Memory the weights of a GGUF file take when loaded: their blocks as stored, or (``dtype``) dequantized."""
    from .checkpoint import gguf as gguf_format

    header = gguf_format.read_header(path)
    if dtype is None:
        return sum(t.nbytes for t in header.tensors.values())
    size = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(t.shape) * size for t in header.tensors.values())


def is_quantized_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a GGUF file (or a directory holding one) with matrices in block formats."""
    from .checkpoint import gguf as gguf_format

    if not gguf_format.detect(path):
        return False
    header = gguf_format.read_header(path)
    return any(t.qtype.name not in ("F32", "F16", "BF16") for t in header.tensors.values())


@torch.no_grad()
def load_gguf_quantized(path: str | os.PathLike, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32, mmap: bool = False,
                        part: Callable[[Any], Any] | None = None) -> Transformer:  # fmt: skip
    """Load a GGUF file keeping its quantized matrices in their blocks: every type in ``GGUF_BLOCK_TYPES`` runs as
    stored (``GGUFLinear``; the embedding table as a ``GGUFEmbedding`` whose rows are dequantized when looked up, a
    tied output head sharing its blocks). Norms and float matrices become `dtype`, the activations' dtype. On a
    GPU, Q8_0/Q4_0/Q4_1/Q4_K matrices take torch's int4/int8 kernels instead.

    On the CPU the blocks are read into the process's memory one tensor at a time, each file page unmapped once
    copied (resident once, as llama.cpp's CPU backend copies Q4_0/Q4_K into its own buffers): decoding streams
    them ~13% faster than page-cache pages (benchmarks/RESULTS.md). ``mmap=True`` keeps them memory-mapped
    instead: instant loading, and pages shared with other processes mapping the same file.

    ``part(tensor)``: each ``GGUFTensor``, once checked against the model's shape, is replaced by what it returns
    (a tensor-parallel rank's whole rows or whole blocks of columns, ``inference.tensor_parallel``); only that
    part is read into memory.
    """
    from gguf import GGMLQuantizationType as Q

    from .checkpoint import gguf as gguf_format
    from .errors import CheckpointError

    device = torch.device(device or "cpu")
    config = gguf_format.read_config(path)
    raw = gguf_format.read_raw(path)
    with torch.device("meta"):
        model = Transformer(config)
    expected = dict(model.state_dict())
    linear_names = {f"{n}.weight" for n, _ in _target_linears(model)}
    tied = config.tie_embeddings and "output.weight" not in raw
    if config.tie_embeddings and not tied:  # a tied model's file with its own output matrix: keep the file's
        config = config.replace(tie_embeddings=False)
        model.config = config
    model.output = nn.Linear(config.dim, config.vocab_size, bias=False, device="meta")  # untie on meta
    experts: dict[str, dict[str, list[nn.Module]]] = {}  # layer -> w1/w2/w3 -> a module per expert
    for name, t in raw.items():
        if name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} ({t.gguf_name})")
        expert = name.endswith(gguf_format.EXPERT_TENSORS)
        want = tuple(expected[name].shape)
        want = (want[0], want[2], want[1]) if expert else want  # GGUF keeps each expert as [out, in]
        if tuple(t.shape) != want:
            raise CheckpointError(f"{path}: tensor {t.gguf_name!r} has shape {list(t.shape)}, expected {list(want)}")
        mapped = t.data.untyped_storage().data_ptr()
        if part is not None:
            t = part(t)
        owner, _, attr = name.rpartition(".")
        blocks = t.qtype not in (Q.F32, Q.F16, Q.BF16)
        if blocks and t.qtype.name not in GGUF_BLOCK_TYPES:
            raise CheckpointError(f"{path}: tensor {t.gguf_name!r} is {t.qtype.name}, which llamaforge cannot run; "
                                  f"supported block types: {', '.join(GGUF_BLOCK_TYPES)}")  # fmt: skip
        # a part that is already a copy (columns) needs no second one
        if blocks and device.type == "cpu" and not mmap and t.data.untyped_storage().data_ptr() == mapped:
            t = replace(t, data=gguf_format.into_memory(t.data))
        if expert:
            if blocks:
                mods = [_gguf_module(t.data[e], t.qtype, t.shape[1:], device) for e in range(t.shape[0])]
            else:
                weight = (t.data.view(torch.float32) if t.qtype == Q.F32 else t.dequantize()).view(t.shape)
                mods = [_float_linear(w) for w in weight.to(device=device, dtype=dtype).unbind(0)]
            experts.setdefault(owner, {})[attr] = mods
        elif blocks and name == "tok_embeddings.weight":
            emb = GGUFEmbedding(t.shape[0], t.shape[1], t.qtype, t.data.to(device), dtype)
            model.tok_embeddings = emb
            if tied:
                model.output = emb.table if device.type == "cpu" else gguf_linear(t.data, t.qtype, t.shape).to(device)
        elif blocks and name in linear_names:
            _set_module(model, owner, _gguf_module(t.data, t.qtype, t.shape, device))
        elif blocks:
            raise CheckpointError(f"{path}: tensor {t.gguf_name!r} is {t.qtype.name}; only matrices may be quantized")
        else:
            value = t.dequantize() if t.qtype != Q.F32 else t.data.view(torch.float32).view(t.shape)
            value = nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False)
            setattr(model.get_submodule(owner), attr, value)
            if name == "tok_embeddings.weight" and tied:
                model.output.weight = model.tok_embeddings.weight
    for layer, parts in experts.items():
        if set(parts) != {"w1", "w2", "w3"}:
            raise CheckpointError(f"{path}: layer {layer} has expert tensors {sorted(parts)}, not all of w1, w2, w3")
        _set_module(model, layer, QuantizedExperts(parts["w1"], parts["w2"], parts["w3"]))
    meta_left = [n for n, p in itertools.chain(model.named_parameters(), model.named_buffers())
                 if p.is_meta and n != "rope_freqs"]  # fmt: skip
    if meta_left:
        raise CheckpointError(f"{path}: missing tensors {', '.join(meta_left[:5])}")
    model.reset_buffers()
    model.quantization = {"scheme": "gguf"}  # type: ignore[assignment]
    return model.eval()


# Saving and loading ----------------------------------------------------------------------------------------
def _config_dict(config: ModelConfig) -> dict[str, Any]:
    d = asdict(config)
    d.pop("extra", None)
    return d


def save_quantized(model: Transformer, path: str | os.PathLike) -> Path:
    """Write a quantized model as a directory: ``model.safetensors`` + ``quantization.json`` (atomically)."""
    from safetensors.torch import save_file

    from .checkpoint import atomic_output

    path = Path(path)
    modules = quantized_modules(model)
    if not modules:
        raise ValueError("model has no quantized layers; call quantize_model() first (or save it as a checkpoint)")
    tensors: dict[str, Tensor] = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict().items():
        if model.config.tie_embeddings and name == "output.weight":
            continue
        key = t.data_ptr()
        if key in seen and t.numel():  # shared storage (tied weights): safetensors stores each once
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    meta = {
        "format_version": QUANT_FORMAT_VERSION,
        "quantization": getattr(model, "quantization", None),
        "config": _config_dict(model.config),
        "modules": {
            n: {"kind": m.kind, **({"group_size": m.group_size} if isinstance(m, Int4Linear) else {}),
                **({"block": m.block} if isinstance(m, BlockInt8Linear) else {}),
                **({"qtype": m.qtype.name} if isinstance(m, GGUFLinear) else {})}
            for n, m in modules.items()
        },
    }  # fmt: skip
    with atomic_output(path, is_dir=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "llamaforge-quantized"})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return path


def is_quantized_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / META_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


@torch.no_grad()
def load_quantized(path: str | os.PathLike, device: torch.device | str | None = None) -> Transformer:
    """Read a directory written by ``save_quantized``."""
    from safetensors import safe_open

    path = Path(path)
    if not is_quantized_dir(path):
        raise FileNotFoundError(f"{path}: not a quantized llamaforge model (expected {META_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads((path / META_FILE).read_text())
        cfg = dict(meta["config"])
        if cfg.get("rope_scaling"):
            cfg["rope_scaling"] = RopeScaling(**cfg["rope_scaling"])
        config = ModelConfig(**cfg)
        modules = meta["modules"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path / META_FILE}: malformed quantization metadata: {exc}") from exc
    if meta.get("format_version") != QUANT_FORMAT_VERSION:
        raise ValueError(f"{path / META_FILE}: unsupported format_version {meta.get('format_version')!r}")
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Transformer(config)
    if config.tie_embeddings:
        model.output = nn.Linear(config.dim, config.vocab_size, bias=False, device="meta")
    with safe_open(str(path / WEIGHTS_FILE), framework="pt", device="cpu") as f:
        stored = list(f.keys())
    split = {m.group(1) for key in stored if (m := re.match(r"(.+\.experts)\.w[123]\.\d+\.", key))}
    for layer in split:  # experts saved one matrix per expert: a QuantizedExperts of float linears to fill in
        n, dim, hidden = model.get_submodule(layer).w1.shape

        def linears(k: int, m: int, n: int = n) -> list[nn.Module]:
            return [nn.Linear(k, m, bias=False, device="meta") for _ in range(n)]

        _set_module(model, layer, QuantizedExperts(linears(dim, hidden), linears(hidden, dim), linears(dim, hidden)))
    for name, spec in modules.items():
        kind = spec.get("kind")
        if kind not in QUANT_MODULES:
            raise ValueError(f"{path / META_FILE}: module {name!r} has unknown kind {kind!r}")
        lin = model.get_submodule(name)
        args = {k: spec[k] for k in ("group_size", "block", "qtype") if k in spec}
        _set_module(model, name, QUANT_MODULES[kind](lin.in_features, lin.out_features, device="meta", **args))
    expected = model.state_dict()
    seen = set()
    with safe_open(str(path / WEIGHTS_FILE), framework="pt", device=str(device)) as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            if key not in expected:
                raise ValueError(f"{path / WEIGHTS_FILE}: unexpected tensor {key!r}")
            t = f.get_tensor(key)
            if t.device.type == "cpu" and t.data_ptr() % 64:
                # safetensors aligns tensor data to 8 bytes only; torch's int8 kernel (_weight_int8pack_mm) crashes
                # on a misaligned weight, so such a tensor gets an aligned copy.
                t = t.clone()
            if tuple(t.shape) != tuple(expected[key].shape):
                raise ValueError(f"{path / WEIGHTS_FILE}: {key!r} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(expected[key].shape)}")  # fmt: skip
            owner, _, attr = key.rpartition(".")
            mod = model.get_submodule(owner)
            if attr in mod._buffers:
                mod._buffers[attr] = t
            else:
                setattr(mod, attr, nn.Parameter(t, requires_grad=False))
            seen.add(key)
    missing = [k for k in expected if k not in seen and not (config.tie_embeddings and k == "output.weight")]
    if missing:
        raise ValueError(f"{path / WEIGHTS_FILE}: missing tensors {', '.join(missing[:5])}")
    if config.tie_embeddings and not isinstance(model.output, _QuantLinear):
        model.output.weight = model.tok_embeddings.weight
    model.reset_buffers()
    model.quantization = meta.get("quantization")  # type: ignore[assignment]
    return model.eval()


__all__ = ["GGUF_BLOCK_TYPES", "SCHEMES", "BlockInt8Linear", "GGUFEmbedding", "GGUFLinear", "Int4Linear", "Int8Linear",
           "QuantizedExperts",
           "gguf_codes", "gguf_linear", "gguf_model_bytes", "is_quantized_dir", "is_quantized_gguf",
           "load_gguf_quantized", "load_quantized", "parse_scheme", "quantize_model", "quantized_modules",
           "save_quantized"]  # fmt: skip
