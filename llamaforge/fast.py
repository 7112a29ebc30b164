"""Inference-time preparation for fast cached forwards (decode steps and prefill chunks).

``prepare_for_inference(model)`` returns a ``FastForward``: a callable with the cached-forward signature
of ``Transformer.forward`` (``fn(tokens, input_pos, rows=..., cache_len=..., return_hidden=...)``) that
computes the same function with fewer, larger kernels:

- wq/wk/wv run as one projection and w1/w3 as one (same input, outputs side by side). Quantized linears of one
  kind (int8, int4, Q8_0 repacked) are concatenated into a new module of that kind (exact: every output row keeps
  its own scales). Float weights and GGUF blocks are never copied: they often are a memory-mapped checkpoint,
  whose copy would double the memory; their parts run one after the other (one native op per decode step
  runs all of them anyway).
- RoPE rotates q and k in one pass; single-token steps attend with two small batched matmuls instead of
  ``scaled_dot_product_attention`` (whose CPU flash kernel costs more than the math at one query).
- 16-bit weights on CPU: the native kernels read them as stored for a few rows; more rows (prefill) are
  multiplied in float32, converting a chunk of weight rows at a time (no float32 copy of the weights).
- With the native kernels (``llamaforge.kernels``), a step of one token per sequence (up to
  ``kernels.MAX_ROWS`` sequences) runs through all layers as one op, ``kernels.decode_step`` (RMSNorm,
  matmuls reading the weights as stored, RoPE + KV-cache write + attention, SiLU-gate, residual adds),
  then the head. The residual stream stays float32 there (as llama.cpp's does), also for 16-bit models;
  the KV cache is whatever ``setup_caches`` allocated (float16 for quantized float32 models in generation).

The model's own modules (norms, embeddings, KV caches, rope functions) do the rest, so the numbers match
``model(...)`` up to float rounding. Models with features this path does not cover (mixture of experts,
qk-norm, NoPE layers, chunked attention) get the model itself back. ``compile_forward`` wraps a forward
in ``torch.compile`` with the inductor settings that suit CPU decoding.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .model import FeedForward, Transformer, apply_rope, rope_cos_sin
from .quantize import GGUFLinear, fuse_quantized, is_quantized

_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


def _native_parts(projection: nn.Module) -> list[tuple[Tensor, Tensor | None]] | None:
    """The (weight, scales) pairs of a projection's parts as ``kernels.decode_step`` takes them, or None
    when one of them has no native form (e.g. a float weight on another device)."""
    modules = list(projection.parts) if isinstance(projection, _Concat) else [projection]
    native = [m.native_weights() if hasattr(m, "native_weights") else None for m in modules]
    return None if any(n is None for n in native) else native  # type: ignore[return-value]


def unsupported_reason(model: Transformer) -> str | None:
    """Why ``FastForward`` cannot run this model, or None when it can."""
    c = model.config
    if c.n_experts:
        return "mixture-of-experts layers"
    if c.use_qk_norm or c.attn_temperature_tuning or c.attention_chunk_size is not None:
        return "Llama 4 attention features"
    if not all(c.uses_rope(i) for i in range(c.n_layers)):
        return "layers without RoPE"
    if not all(isinstance(layer.feed_forward, FeedForward) for layer in model.layers):
        return "a non-SwiGLU feed-forward"
    return None


class _FastLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        att, ff = layer.attention, layer.feed_forward
        self.attention_norm, self.ffn_norm = layer.attention_norm, layer.ffn_norm
        self.n_heads, self.n_kv_heads, self.head_dim = att.n_heads, att.n_kv_heads, att.head_dim
        self.qkv = fuse_linears([att.wq, att.wk, att.wv])
        self.wo = fuse_linears([att.wo])
        self.w13 = fuse_linears([ff.w1, ff.w3])
        self.w2 = fuse_linears([ff.w2])
        self.hidden = ff.w1.out_features
        self.owner = weakref.ref(att)  # its kv_cache is replaced by setup_caches: look it up each call

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, mask: Tensor, bias: Tensor | None,
                rows: Tensor | None, cache_len: int) -> Tensor:  # fmt: skip
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(self.attention_norm(x))
        qk = apply_rope(qkv[..., : (H + Hkv) * D].view(B, T, H + Hkv, D), cos, sin)
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
        v = qkv[..., (H + Hkv) * D :].view(B, T, Hkv, D).transpose(1, 2)
        cache = self.owner().kv_cache
        k, v = cache.update(positions, k, v, cache_len, rows)
        if bias is not None:  # one query per row: two small matmuls beat the flash kernel
            G = H // Hkv
            qg = q.reshape(B, Hkv, G, D)
            scores = torch.matmul(qg, k.transpose(-1, -2)).float() * (D**-0.5) + bias
            y = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)  # [B, Hkv, G, D]
            y = y.reshape(B, 1, H * D)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hkv != H)
            y = y.transpose(1, 2).reshape(B, T, H * D)
        h = x + self.wo(y)
        g = self.w13(self.ffn_norm(h))
        return h + self.w2(F.silu(g[..., : self.hidden]) * g[..., self.hidden :])


class FastForward(nn.Module):
    """The cached forward of ``model`` with fused projections; other calls go to the model itself."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"FastForward does not support {reason}")
        self._model = weakref.ref(model)
        self.layers = nn.ModuleList(_FastLayer(layer) for layer in model.layers)
        self.head = fuse_linears([model.output])
        self._stamp = _stamp(model)
        self._native = self._native_params(model)

    def _native_params(self, model: Transformer) -> tuple[list[Tensor | None], list[int]] | None:
        """``kernels.decode_step``'s params and parts for this model, or None when it is not on the CPU or a
        projection has no native form."""
        if model.tok_embeddings.weight.device.type != "cpu":
            return None

        def norm(m: nn.Module) -> Tensor:  # the parameter itself: later in-place updates are seen
            return m.weight.detach()

        params: list[Tensor | None] = []
        parts: list[int] = []
        for layer in self.layers:
            params += [norm(layer.attention_norm), norm(layer.ffn_norm)]
            for projection in (layer.qkv, layer.wo, layer.w13, layer.w2):
                native = _native_parts(projection)
                if native is None:
                    return None
                parts.append(len(native))
                params += [t for pair in native for t in pair]
        return [*params, norm(model.norm)], parts

    @property
    def model(self) -> Transformer:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this FastForward was freed")
        return model

    def is_current(self) -> bool:
        """False once the model's weights were moved, cast or replaced after preparation."""
        return _stamp(self.model) == self._stamp

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, *, rows: Tensor | None = None,
                cache_len: int | None = None, attn_mask: Tensor | None = None,
                return_hidden: bool = False) -> Tensor:  # fmt: skip
        model = self.model
        if input_pos is None or attn_mask is not None:
            return model(tokens, input_pos, rows=rows, cache_len=cache_len, attn_mask=attn_mask,
                         return_hidden=return_hidden)  # fmt: skip
        if model.cache_shape is None:
            raise RuntimeError("input_pos given but no KV cache: call setup_caches() first")
        B, T = tokens.shape
        positions = input_pos.expand(B, T) if input_pos.dim() == 1 else input_pos
        cache_len = cache_len or model.cache_shape[1]
        if T == 1 and B <= kernels.MAX_ROWS and self._native is not None and kernels.available():
            return self._native_step(model, tokens, positions, rows, cache_len, return_hidden)
        x = model.tok_embeddings(tokens)
        keys = torch.arange(cache_len, device=tokens.device)
        mask = keys[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, S]
        bias = None
        if T == 1:  # additive mask [B, 1, 1, S] for the single-query attention
            bias = torch.zeros(mask.shape, dtype=torch.float32, device=tokens.device).masked_fill_(~mask, -torch.inf)
        cos, sin = rope_cos_sin(model.rope_freqs, positions)
        for layer in self.layers:
            x = layer(x, cos, sin, positions, mask, bias, rows, cache_len)
        x = model.norm(x)
        return x if return_hidden else self.head(x)

    def _native_step(self, model: Transformer, tokens: Tensor, positions: Tensor, rows: Tensor | None,
                     cache_len: int, return_hidden: bool) -> Tensor:  # fmt: skip
        assert self._native is not None
        params, parts = self._native
        B = tokens.shape[0]
        embeddings = model.tok_embeddings(tokens)
        dtype = embeddings.dtype
        cos, sin = rope_cos_sin(model.rope_freqs, positions)
        caches = [layer.attention.kv_cache for layer in model.layers]
        x = kernels.decode_step(embeddings.view(B, -1), cos.view(B, -1), sin.view(B, -1),
                                positions.view(B), torch.arange(B) if rows is None else rows, cache_len, params,
                                parts, [c.k for c in caches], [c.v for c in caches], model.config.n_heads,
                                model.config.kv_heads, model.norm.eps)  # fmt: skip
        out = x if return_hidden else self.head(x)
        return out.view(B, 1, -1).to(dtype)


def _stamp(model: Transformer) -> tuple:
    first = model.layers[0].attention.wq
    ref = first.weight if isinstance(first, nn.Linear) else next(iter(first.buffers()))
    return (ref.data_ptr(), ref.dtype, ref.device, model.output.__class__, model.tok_embeddings.weight.data_ptr())


def prepare_for_inference(model: Transformer) -> Callable[..., Tensor]:
    """The fastest eager forward for cached generation steps: a ``FastForward`` (built once per model and
    rebuilt if the weights changed), or the model itself when it uses features FastForward lacks."""
    if unsupported_reason(model) is not None:
        return model
    fast = _PREPARED.get(model)
    if fast is None or not fast.is_current():
        fast = FastForward(model)
        _PREPARED[model] = fast
    return fast


def compile_forward(fn: Callable[..., Tensor], mode: str | None = None) -> Callable[..., Tensor]:
    """``torch.compile`` of a forward, with static shapes (``cache_len`` comes in few distinct values)."""
    return torch.compile(fn, mode=mode, fullgraph=False, dynamic=False)
