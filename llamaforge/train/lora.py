"""LoRA and QLoRA: low-rank adapters on chosen linear layers of a frozen base model.

An adapted layer computes ``base(x) + (alpha / r) * B(A(dropout(x)))`` with ``A`` [r, in] and ``B`` [out, r]
(``B`` starts at zero, so training starts from the base model's function). Only ``A`` and ``B`` train: a rank-r
adapter on an ``in x out`` linear has exactly ``r * (in + out)`` parameters.

QLoRA keeps the frozen base in 4 bits: NF4 (the QLoRA paper's normal-float code, absmax per block of 64
weights) or llamaforge's int4 (``quantize.Int4Linear``, asymmetric groups). The base weight is dequantized on
the fly in forward and again in backward (``_FrozenDequantLinear``), so no float copy of it is kept between
the two passes.

Adapters are saved alone: ``adapter_model.safetensors`` + ``adapter_config.json``. The default layout is
Hugging Face PEFT's (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, q/k ``lora_B`` rows
permuted to the HF rotary layout), so an adapter trained here loads with ``peft`` on the HF export of the
base model, and a PEFT LoRA adapter for a Llama model loads here. ``layout="llamaforge"`` keeps llamaforge's
own names (needed for layers with no HF counterpart, e.g. Llama 4 shared experts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
QUANT_SCHEMES = ("nf4", "int4", "int4-g32", "int4-g64", "int4-g128")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# our short target name <-> the HF LlamaForCausalLM module name
_HF_TARGET = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w3": "up_proj",
              "w2": "down_proj", "output": "lm_head"}  # fmt: skip
_FROM_HF_TARGET = {v: k for k, v in _HF_TARGET.items()}
_HF_MODULE = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
              "w1": "mlp.gate_proj", "w3": "mlp.up_proj", "w2": "mlp.down_proj"}  # fmt: skip
_OUR_BLOCK = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention", "w1": "feed_forward",
              "w2": "feed_forward", "w3": "feed_forward"}  # fmt: skip


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = parse_targets(self.targets)
        self.targets = tuple(self.targets)
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {list(self.targets)}: choose from {', '.join(LORA_TARGETS)}")
        if not (isinstance(self.r, int) and self.r > 0):
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def parse_targets(spec: str | Iterable[str]) -> tuple[str, ...]:
    """ "wq,wv" / "all" / "attention" / "mlp" (or HF names such as q_proj) -> our short names."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    out: list[str] = []
    for item in items:
        if item == "all":
            out += list(LORA_TARGETS)
        elif item == "attention":
            out += ["wq", "wk", "wv", "wo"]
        elif item == "mlp":
            out += ["w1", "w2", "w3"]
        else:
            out.append(_FROM_HF_TARGET.get(item, item))
    return tuple(dict.fromkeys(out))


# Frozen 4-bit bases ---------------------------------------------------------------------------------------
def nf4_code() -> Tensor:
    """The 16 NF4 levels: quantiles of N(0, 1) (8 positive, 7 negative, and an exact zero), scaled to [-1, 1],
    built as the QLoRA paper describes."""
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.9677083  # the outermost quantile: keeps the extreme levels finite (the paper's choice)
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).float()


class NF4Linear(nn.Module):
    """A frozen linear layer stored as NF4: 4-bit codes (two per byte) and a float32 absmax per block of
    ``block_size`` consecutive weights (of the row-major flattened matrix). 4.5 bits per weight."""

    kind = "nf4"

    def __init__(self, in_features: int, out_features: int, block_size: int = 64, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        n_blocks = math.ceil(in_features * out_features / block_size)
        self.register_buffer("qweight", torch.zeros(n_blocks * block_size // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.ones(n_blocks, dtype=torch.float32, device=device))
        self.register_buffer("code", nf4_code().to(device), persistent=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}"

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: Tensor, block_size: int = 64) -> NF4Linear:
        out_f, in_f = weight.shape
        mod = cls(in_f, out_f, block_size, device=weight.device)
        flat = weight.detach().float().flatten()
        flat = F.pad(flat, (0, mod.absmax.numel() * block_size - flat.numel()))
        blocks = flat.view(-1, block_size)
        absmax = blocks.abs().amax(dim=1).clamp(min=1e-12)
        normed = (blocks / absmax[:, None]).flatten()
        code = mod.code
        q = torch.bucketize(normed, (code[1:] + code[:-1]) / 2).to(torch.uint8)  # nearest level
        mod.qweight.copy_(q[0::2] | (q[1::2] << 4))
        mod.absmax.copy_(absmax)
        return mod

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        q = torch.stack((self.qweight & 0x0F, self.qweight >> 4), dim=-1).flatten().long()
        w = (self.code[q].view(-1, self.block_size) * self.absmax[:, None]).flatten()
        return w[: self.in_features * self.out_features].view(self.out_features, self.in_features).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return frozen_linear(x, self)


class _FrozenDequantLinear(torch.autograd.Function):
    """y = x W^T for a frozen quantized W: dequantized in forward, again in backward (nothing saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, module: nn.Module) -> Tensor:
        ctx.module, ctx.x_dtype = module, x.dtype
        return F.linear(x, module.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        w = ctx.module.dequantize(grad.dtype)
        return (grad @ w).to(ctx.x_dtype), None


def frozen_linear(x: Tensor, module: nn.Module) -> Tensor:
    """A quantized module's output, differentiable in ``x`` (torch's int4/int8 kernels have no backward); the
    module's own kernels serve inference only."""
    if torch.is_grad_enabled():  # training: the float GEMM on the dequantized weight (kernels round to bf16)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            if x.requires_grad:
                return _FrozenDequantLinear.apply(x.to(dtype), module)
            return F.linear(x.to(dtype), module.dequantize(dtype))
    if isinstance(module, NF4Linear):
        return F.linear(x, module.dequantize(x.dtype))
    return module(x)


def _is_quantized(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear) and hasattr(module, "dequantize")


def _block_linears(model: nn.Module, names: Iterable[str]) -> list[tuple[str, nn.Module]]:
    pattern = re.compile(r"(^|\.)(" + "|".join(map(re.escape, names)) + r")$")
    return [(n, m) for n, m in model.named_modules() if pattern.search(n) and (
        isinstance(m, nn.Linear) or _is_quantized(m) or isinstance(m, LoRALinear))]  # fmt: skip


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


@torch.no_grad()
def quantize_base(model: nn.Module, scheme: str = "nf4") -> nn.Module:
    """Replace the attention and feed-forward linears (not the output head) with frozen 4-bit modules, in place:
    ``"nf4"`` or llamaforge's ``"int4"``/``"int4-gN"``. Embeddings, norms and the head stay float and frozen."""
    from ..quantize import Int4Linear, check_int4_shape, parse_scheme

    if scheme not in QUANT_SCHEMES:
        raise ValueError(f"QLoRA base quantization {scheme!r}: choose one of {', '.join(QUANT_SCHEMES)}")
    targets = [(n, m) for n, m in _block_linears(model, DEFAULT_TARGETS) if isinstance(m, nn.Linear)]
    group = None
    if scheme != "nf4":
        _, group = parse_scheme(scheme)
        for name, lin in targets:  # every shape is checked before anything changes
            check_int4_shape(lin.in_features, lin.out_features, group, name)
    for name, lin in targets:
        new = NF4Linear.from_float(lin.weight) if scheme == "nf4" else Int4Linear.from_float(lin.weight, group)
        _set_module(model, name, new)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# LoRA ------------------------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(dropout(x)))`` around a frozen ``nn.Linear`` or quantized linear ``base``."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        ref = getattr(base, "weight", None)
        dtype = ref.dtype if isinstance(ref, Tensor) and ref.is_floating_point() else torch.float32
        device = next(iter(base.buffers()), ref).device if ref is None else ref.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # True: the layer is its base alone (see adapters_disabled)
        for p in base.parameters():
            p.requires_grad_(False)
        self.reset_lora()

    def reset_lora(self) -> None:
        """A as nn.Linear's default (Kaiming-uniform, as PEFT), B = 0: the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha:g}"

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x) if isinstance(self.base, nn.Linear) else frozen_linear(x, self.base)
        if self.disabled:
            return y
        h = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return y + (h * self.scale).to(y.dtype)

    def base_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        if isinstance(self.base, nn.Linear):
            w = self.base.weight
            return w if dtype is None else w.to(dtype)
        return self.base.dequantize(dtype or self.lora_A.dtype)

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    @property
    def weight(self) -> Tensor:
        """The merged weight, differentiable in A and B: what the fused loss reads for an adapted output head
        (LoRA dropout does not apply there; see ``adapt_recipe_for_lora``)."""
        if self.disabled:
            return self.base_weight(self.lora_A.dtype)
        return self.base_weight(self.lora_A.dtype) + self.delta_weight()

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding base + adapter (quantized bases are dequantized)."""
        w = self.base_weight(torch.float32).float() + self.delta_weight().float()
        out_dtype = self.base.weight.dtype if isinstance(self.base, nn.Linear) else self.lora_A.dtype
        lin = nn.Linear(self.in_features, self.out_features, bias=False, device=w.device, dtype=out_dtype)
        lin.weight.copy_(w)
        lin.weight.requires_grad_(False)
        return lin


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, config: LoraConfig, freeze: bool = True) -> dict[str, LoRALinear]:
    """Freeze the model (``freeze``) and wrap every targeted linear in a ``LoRALinear``, in place.

    Returns the adapted modules by name. Targets are matched by the last name component (wq, ..., output);
    the output head of a tied model keeps sharing the (frozen) embedding matrix as its base.
    """
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    found = _block_linears(model, config.targets)
    if not found:
        raise ValueError(f"no linear layers named {list(config.targets)} in the model")
    adapted = {}
    for name, mod in found:
        if isinstance(mod, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        lora = LoRALinear(mod, config.r, config.alpha, config.dropout)
        _set_module(model, name, lora)
        adapted[name] = lora
    model.lora_config = config  # type: ignore[assignment]
    return adapted


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model alone inside the block: every LoRA layer skips its adapter (preference tuning's reference
    model, with no second copy of the weights)."""
    layers = list(lora_modules(model).values())
    if not layers:
        raise ValueError("the model has no LoRA adapters to disable")
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def expected_lora_parameters(model: nn.Module) -> int:
    """Sum of r * (in + out) over the adapted layers."""
    return sum(m.r * (m.in_features + m.out_features) for m in lora_modules(model).values())


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer (``W + scale * B @ A``), in place; the result is a plain Transformer.

    A tied model whose output head was adapted gets its own head (``tie_embeddings`` becomes False).
    """
    for name, mod in lora_modules(model).items():
        _set_module(model, name, mod.merged())
        if name.split(".")[-1] == "output" and getattr(model.config, "tie_embeddings", False):
            model.config = dataclasses.replace(model.config, tie_embeddings=False)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# Saving and loading adapters -------------------------------------------------------------------------------
def _hf_module_name(name: str) -> str | None:
    """layers.3.attention.wq -> model.layers.3.self_attn.q_proj; output -> lm_head; None when HF has none."""
    if name == "output":
        return "lm_head"
    m = re.fullmatch(r"layers\.(\d+)\.(attention|feed_forward)\.(w[qkvo123])", name)
    if m and _OUR_BLOCK.get(m.group(3)) == m.group(2):
        return f"model.layers.{m.group(1)}.{_HF_MODULE[m.group(3)]}"
    return None


def _our_module_name(hf: str) -> str | None:
    if hf == "lm_head":
        return "output"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)", hf)
    if m and m.group(3) in _FROM_HF_TARGET:
        short = _FROM_HF_TARGET[m.group(3)]
        return f"layers.{m.group(1)}.{_OUR_BLOCK[short]}.{short}"
    return None


def _qk_heads(name: str, config: Any) -> int | None:
    last = name.split(".")[-1]
    if last == "wq":
        return config.n_heads
    if last == "wk":
        return config.kv_heads
    return None


def adapter_tensors(source: nn.Module | Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """{module name: (A, B)} from a model with LoRA layers or from a state dict (``...lora_A``/``lora_B`` keys,
    any prefix such as ``model.`` from the training wrapper is stripped)."""
    if isinstance(source, nn.Module):
        return {n: (m.lora_A.detach(), m.lora_B.detach()) for n, m in lora_modules(source).items()}
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for key, a in source.items():
        if key.endswith(".lora_A"):
            name = key[: -len(".lora_A")]
            name = name[len("model.") :] if name.startswith("model.") else name
            out[name] = (a, source[key[: -len("lora_A")] + "lora_B"])
    return out


def save_adapter(source: nn.Module | Mapping[str, Tensor], path: str | os.PathLike, config: LoraConfig,
                 model_config: Any, *, base_model: str = "", layout: str = "peft",
                 dtype: torch.dtype | None = None) -> Path:  # fmt: skip
    """Write the adapters alone (safetensors + adapter_config.json), atomically; see the module docstring."""
    from safetensors.torch import save_file

    from ..checkpoint import atomic_output
    from ..checkpoint.hf import permute_to_hf

    if layout not in ("peft", "llamaforge"):
        raise ValueError(f"adapter layout {layout!r}: choose peft or llamaforge")
    pairs = adapter_tensors(source)
    if not pairs:
        raise ValueError("the model has no LoRA adapters to save")
    tensors: dict[str, Tensor] = {}
    for name, (a, b) in sorted(pairs.items()):
        a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        if layout == "llamaforge":
            tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = a, b
            continue
        hf = _hf_module_name(name)
        if hf is None:
            raise ValueError(f"{name} has no Hugging Face counterpart; save with layout='llamaforge'")
        heads = _qk_heads(name, model_config)
        if heads is not None:  # HF stores q/k output rows in the rotate-half order
            b = permute_to_hf(b, heads).contiguous()
        tensors[f"{_PEFT_PREFIX}{hf}.lora_A.weight"], tensors[f"{_PEFT_PREFIX}{hf}.lora_B.weight"] = a, b
    targets = sorted({_HF_TARGET[n.split(".")[-1]] if layout == "peft" else n.split(".")[-1] for n in pairs})
    meta = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
            "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "target_modules": targets,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True,
            "modules_to_save": None}  # fmt: skip
    if layout == "llamaforge":
        meta["peft_type"] = "LLAMAFORGE_LORA"  # not loadable by peft: our own tensor names
    path = Path(path)
    with atomic_output(path, is_dir=True) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_adapter(path: str | os.PathLike, model_config: Any) -> tuple[LoraConfig, dict[str, tuple[Tensor, Tensor]]]:
    """An adapter directory (ours or PEFT's LoRA for a Llama model) -> (config, {our module name: (A, B)})."""
    from safetensors.torch import load_file

    from ..checkpoint.hf import permute_from_hf
    from ..errors import CheckpointError

    path = Path(path)
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: not an adapter directory (no {ADAPTER_CONFIG})")
    meta = json.loads(cfg_file.read_text())
    if meta.get("peft_type") not in ("LORA", "LLAMAFORGE_LORA"):
        raise CheckpointError(f"{cfg_file}: peft_type {meta.get('peft_type')!r} is not a LoRA adapter")
    for key, bad in (("use_rslora", True), ("use_dora", True), ("fan_in_fan_out", True)):
        if meta.get(key) == bad:
            raise CheckpointError(f"{cfg_file}: {key}={bad} is not supported")
    if meta.get("bias", "none") != "none":
        raise CheckpointError(f"{cfg_file}: bias={meta['bias']!r} is not supported (only 'none')")
    weights = path / ADAPTER_WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS}")
    raw = load_file(str(weights))
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    peft = any(k.startswith(_PEFT_PREFIX) for k in raw)
    for key, a in raw.items():
        suffix = ".lora_A.weight" if peft else ".lora_A"
        if not key.endswith(suffix):
            continue
        stem = key[: -len(suffix)]
        b_key = stem + (".lora_B.weight" if peft else ".lora_B")
        if b_key not in raw:
            raise CheckpointError(f"{weights}: {key} has no matching lora_B")
        b = raw[b_key]
        if peft:
            name = _our_module_name(stem[len(_PEFT_PREFIX) :].replace(".default", ""))
            if name is None:
                raise CheckpointError(f"{weights}: {key} names no llamaforge layer")
            heads = _qk_heads(name, model_config)
            if heads is not None:
                b = permute_from_hf(b, heads)
        else:
            name = stem
        pairs[name] = (a, b)
    if not pairs:
        raise CheckpointError(f"{weights}: no LoRA tensors")
    ranks = {a.shape[0] for a, _ in pairs.values()}
    r = int(meta.get("r") or ranks.pop())
    targets = tuple(dict.fromkeys(n.split(".")[-1] for n in pairs))
    config = LoraConfig(r=r, alpha=float(meta.get("lora_alpha", r)), dropout=0.0, targets=targets)
    return config, pairs


@torch.no_grad()
def apply_adapter(model: nn.Module, adapter_dir: str | os.PathLike, merge: bool = False) -> nn.Module:
    """Attach the adapter in ``adapter_dir`` to ``model`` (in place) and return it, ready for inference.

    The base may be float or quantized (``llamaforge.load(..., quantize=...)``); the adapters run beside it
    unmerged. ``merge=True`` folds them into the weights instead (float bases only keep their dtype).
    This is the hook for ``llamaforge.load(base, adapter=DIR)``.
    """
    from ..errors import CheckpointError

    config, pairs = read_adapter(adapter_dir, model.config)
    adapted = apply_lora(model, config)
    missing, extra = sorted(set(adapted) - set(pairs)), sorted(set(pairs) - set(adapted))
    if missing or extra:
        raise CheckpointError(f"{adapter_dir}: adapter does not fit the model: no weights for {missing[:4]}, "
                              f"unknown layers {extra[:4]}")  # fmt: skip
    for name, mod in adapted.items():
        a, b = pairs[name]
        if a.shape != mod.lora_A.shape or b.shape != mod.lora_B.shape:
            raise CheckpointError(f"{adapter_dir}: {name}: adapter shapes {tuple(a.shape)}/{tuple(b.shape)} do not "
                                  f"fit {tuple(mod.lora_A.shape)}/{tuple(mod.lora_B.shape)}")  # fmt: skip
        mod.lora_A.copy_(a)
        mod.lora_B.copy_(b)
    if merge:
        merge_lora(model)
    model.eval()
    return model
