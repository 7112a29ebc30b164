"""Which forward runs a model's cached steps, chosen once per engine: ``select_step(model, compile)``.

Every cached forward of an engine (prefill chunks, decode steps, speculative verification) goes through the
one ``Step`` chosen when the engine is built, named and logged:

- ``native``: on CPU, for models without Llama 4's attention features or experts, when the native kernels
  (``llamaforge.kernels``) are built. A ``FastForward``: up to ``kernels.MAX_ROWS`` query rows (decode steps,
  draft verification, the short tail of a prompt after a prefix-cache hit) run through all layers as one op,
  ``kernels.decode_step``, reading the weights as stored and the KV cache through the block tables; larger
  prefill chunks run layer by layer with fused projections (``llamaforge/fast.py``) and torch's GEMMs.
- ``compiled``: ``torch.compile`` of the model (``compile=True``; ``LLAMAFORGE_COMPILE_MODE`` picks the mode;
  on GPU "reduce-overhead", i.e. CUDA graphs: a decode step is hundreds of small kernels there). Block tables
  are padded to a multiple of ``COMPILED_KEYS`` positions so that shapes, and recompilations, are few.
- ``eager``: everything else (GPUs without compile, models FastForward does not cover, no native kernels):
  a ``FastForward`` without the native op on CPU, else the model's own forward.

All of them compute model.py's function (tests compare them with ``model(...)``); the residual stream of the
native op stays float32, as llama.cpp's does.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..fast import fuse_linears, native_parts
from ..model import FeedForward, Transformer, apply_rope, rope_cos_sin
from .cache import PagedView

log = logging.getLogger("llamaforge.inference")

COMPILED_KEYS = 256  # compiled steps: key positions (block-table width) in multiples of this


def unsupported_reason(model: Transformer) -> str | None:
    """Why ``FastForward`` cannot run this model, or None when it can."""
    c = model.config
    if c.cross_attention_layers:
        return "gated cross-attention layers (Llama 3.2 Vision)"
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
        self.layer_id = att.layer_id
        self.qkv = fuse_linears([att.wq, att.wk, att.wv])
        self.wo = fuse_linears([att.wo])
        self.w13 = fuse_linears([ff.w1, ff.w3])
        self.w2 = fuse_linears([ff.w2])
        self.hidden = ff.w1.out_features

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, mask: Tensor, bias: Tensor | None,
                cache: PagedView) -> Tensor:  # fmt: skip
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(self.attention_norm(x))
        qk = apply_rope(qkv[..., : (H + Hkv) * D].view(B, T, H + Hkv, D), cos, sin)
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
        v = qkv[..., (H + Hkv) * D :].view(B, T, Hkv, D).transpose(1, 2)
        k, v = cache.update(self.layer_id, positions, k, v)
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
    """The cached forward of `model` with fused projections and, on CPU, the native whole-step op:
    ``fast(tokens, positions, cache=view, return_hidden=False)`` as ``model(...)`` computes it."""

    def __init__(self, model: Transformer, native: bool = True) -> None:
        super().__init__()
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"FastForward does not support {reason}")
        self._model = weakref.ref(model)
        self.layers = nn.ModuleList(_FastLayer(layer) for layer in model.layers)
        self.head = fuse_linears([model.output])
        self._stamp = _stamp(model)
        self._native = self._native_params(model) if native else None

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
                native = native_parts(projection)
                if native is None:
                    return None
                parts.append(len(native))
                params += [t for pair in native for t in pair]
        return [*params, norm(model.norm)], parts

    @property
    def native(self) -> bool:
        """Whether small batches run as one native op."""
        return self._native is not None and kernels.available()

    @property
    def model(self) -> Transformer:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this FastForward was freed")
        return model

    def is_current(self) -> bool:
        """False once the model's weights were moved, cast or replaced after preparation."""
        return _stamp(self.model) == self._stamp

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, *, cache: PagedView | None = None,
                attn_mask: Tensor | None = None, return_hidden: bool = False,
                input_embeds: Tensor | None = None) -> Tensor:  # fmt: skip
        model = self.model
        if cache is None or attn_mask is not None:
            return model(tokens, input_pos, cache=cache, attn_mask=attn_mask, return_hidden=return_hidden,
                         input_embeds=input_embeds)  # fmt: skip
        assert input_pos is not None, "a cached forward needs input_pos"
        B, T = tokens.shape
        positions = input_pos.expand(B, T) if input_pos.dim() == 1 else input_pos
        x = model.tok_embeddings(tokens) if input_embeds is None else input_embeds
        if B * T <= kernels.MAX_ROWS and self.native:
            return self._native_step(model, x, positions, cache, return_hidden)
        keys = torch.arange(cache.key_length, device=tokens.device)
        mask = keys[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, S]
        bias = None
        if T == 1:  # additive mask [B, 1, 1, S] for the single-query attention
            bias = torch.zeros(mask.shape, dtype=torch.float32, device=tokens.device).masked_fill_(~mask, -torch.inf)
        cos, sin = rope_cos_sin(model.rope_freqs, positions)
        for layer in self.layers:
            x = layer(x, cos, sin, positions, mask, bias, cache)
        x = model.norm(x)
        return x if return_hidden else self.head(x)

    def _native_step(self, model: Transformer, embeddings: Tensor, positions: Tensor, cache: PagedView,
                     return_hidden: bool) -> Tensor:  # fmt: skip
        assert self._native is not None
        params, parts = self._native
        B, T = positions.shape
        dtype = embeddings.dtype  # the activations' (a GGUF embedding table is blocks of uint8)
        rows = positions.reshape(B * T)
        cos, sin = rope_cos_sin(model.rope_freqs, rows.view(B * T, 1))
        table = cache.table if T == 1 else cache.table.repeat_interleave(T, dim=0)
        pool = cache.cache
        x = kernels.decode_step(embeddings.view(B * T, -1), cos.view(B * T, -1),
                                sin.view(B * T, -1), rows, table, params, parts, list(pool.k.unbind(0)),
                                list(pool.v.unbind(0)), model.config.n_heads, model.config.kv_heads,
                                model.norm.eps)  # fmt: skip
        out = x if return_hidden else self.head(x)
        return out.view(B, T, -1).to(dtype)


def _stamp(model: Transformer) -> tuple:
    first = model.layers[0].attention.wq
    ref = first.weight if isinstance(first, nn.Linear) else next(iter(first.buffers()))
    return (ref.data_ptr(), ref.dtype, ref.device, model.output.__class__, model.tok_embeddings.weight.data_ptr())


@dataclass
class Step:
    """The cached forward an engine uses for every step, and the output head for the rows it needs."""

    name: str  # "native" | "compiled" | "eager"
    detail: str
    forward: Callable[..., Tensor]  # (tokens [B, T], positions [B, T], cache=view, return_hidden=True)
    head: Callable[[Tensor], Tensor]  # hidden rows [N, dim] -> logits [N, vocab]
    table_multiple: int = 1  # block tables are padded to a multiple of this many blocks
    fast: FastForward | None = None

    def hidden(self, tokens: Tensor, positions: Tensor, cache: PagedView, **inputs: Any) -> Tensor:
        """Hidden states [B, T, dim]; `inputs`: a vision adapter's extra forward arguments (``llamaforge.vision``)."""
        return self.forward(tokens, positions, cache=cache, return_hidden=True, **inputs)

    def is_current(self, model: Transformer) -> bool:
        return self.fast is None or (self.fast.model is model and self.fast.is_current())

    def __str__(self) -> str:
        return f"{self.name} ({self.detail})"


def select_step(model: Transformer, compile: bool = False, block_size: int = 16) -> Step:
    """The step for `model`, chosen once (see the module docstring) and logged."""
    device = model.tok_embeddings.weight.device
    reason = unsupported_reason(model)
    if getattr(model, "tensor_parallel", None) is not None:  # split over processes: rank 0 leads the others
        from .tensor_parallel import leader_step

        step = leader_step(model)
    elif compile:
        on_gpu = device.type == "cuda"
        mode = os.environ.get("LLAMAFORGE_COMPILE_MODE") or ("reduce-overhead" if on_gpu else None)
        compiled = torch.compile(model, mode=mode, fullgraph=False, dynamic=None if on_gpu else False)
        step = Step("compiled", f"torch.compile mode={mode or 'default'} on {device.type}", compiled, model.output,
                    table_multiple=max(1, COMPILED_KEYS // block_size))  # fmt: skip
    elif device.type == "cpu" and reason is None:
        fast = FastForward(model)
        if fast.native:
            detail = f"kernels.decode_step for up to {kernels.MAX_ROWS} rows, fused projections above"
            step = Step("native", detail, fast, fast.head, fast=fast)
        else:
            why = "no native kernels" if fast._native is not None else "weights without a native form"
            step = Step("eager", f"fused projections on CPU; {why}", fast, fast.head, fast=fast)
    else:
        why = reason or f"on {device.type}"
        step = Step("eager", f"the model's forward ({why})", model, model.output)
    log.info("llamaforge: inference step = %s", step)
    return step
