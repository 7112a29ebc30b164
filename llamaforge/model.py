"""The LLaMA family's math in one file: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, the
Llama 4 mixture of experts, and Llama 3.2 Vision's gated cross-attention layers.

Parameter names follow Meta's reference code (``wq/wk/wv/wo``, ``w1/w2/w3``, ``attention_norm``,
``ffn_norm``) so that Meta checkpoints load without renaming. Rotary embeddings rotate adjacent pairs
of dimensions, as Meta's complex-number formulation does; Hugging Face checkpoints are permuted into
this layout on load (see ``checkpoint/hf.py``). Nothing here knows about parallelism, training,
quantization or file formats, and the model keeps no inference state: a KV cache is an object the caller
owns and passes in (``model(tokens, positions, cache=...)``, see ``llamaforge/inference/cache.py``).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_normalize(x, self.eps) * self.weight


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x / rms(x), computed in float32 whatever the input dtype (as Meta's reference does)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


# Rotary position embeddings -------------------------------------------------------------------
def rope_frequencies(config: ModelConfig) -> Tensor:
    """Per-pair rotation frequencies, with the Llama 3.1 long-context scaling when configured."""
    hd = config.dim_per_head
    # Always on the CPU (then moved): arithmetic on meta tensors would import torch._dynamo (seconds).
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, device="cpu")[: hd // 2].float() / hd))
    s = config.rope_scaling
    if s is None:
        return freqs
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    low_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_wavelen = s.original_max_seq_len / s.high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / s.factor, freqs)
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_band, (1 - smooth) * scaled / s.factor + smooth * scaled, scaled)


def rope_cos_sin(freqs: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin of shape [B, T, 1, head_dim/2] for integer positions [B, T], in float32."""
    angles = positions.float().unsqueeze(-1) * freqs
    return angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs (x0, x1) of x [B, T, H, D] by the position's angle, in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():  # inductor fuses the real form into one kernel; it has no complex codegen
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    else:  # eager: (x0 + i*x1) * (cos + i*sin) is one kernel forward and one backward, the real form seven
        out = torch.view_as_real(torch.view_as_complex(pairs) * torch.complex(cos, sin))
    return out.flatten(-2).type_as(x)


# Attention ---------------------------------------------------------------------------------------
class KVCacheView(Protocol):
    """What a cached forward needs from a KV cache (one batch of sequences, see ``inference.cache``)."""

    @property
    def key_length(self) -> int:
        """Key positions 0..key_length-1 that ``update`` returns for every sequence of the batch."""
        ...

    def update(self, layer: int, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [B, Hkv, T, D] of layer ``layer`` at ``positions`` [B, T]; return each sequence's keys and
        values [B, Hkv, key_length, D] at positions 0..key_length-1, in k's dtype."""
        ...


class HeadProjections(nn.Module):
    """The q, k, v and output projections of an attention over `config`'s heads (Meta's names)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.dim_per_head
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)


class Attention(HeadProjections):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__(config)
        self.use_rope = config.uses_rope(layer_id)
        self.qk_norm_eps = config.norm_eps if (config.use_qk_norm and self.use_rope) else None
        self.temperature_tuning = config.attn_temperature_tuning and not self.use_rope
        self.floor_scale, self.attn_scale = config.attn_floor_scale, config.attn_scale
        self.layer_id = layer_id
        self.cache_layer = config.kv_layer(layer_id)  # == layer_id unless cross-attention layers come before

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, mask: Tensor | None,
                cache: KVCacheView | None) -> Tensor:  # fmt: skip
        B, T, _ = x.shape
        # Heads counted from the projections: under tensor parallelism each rank holds a slice of them.
        q = self.wq(x).view(B, T, -1, self.head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.qk_norm_eps is not None:
            q, k = rms_normalize(q, self.qk_norm_eps), rms_normalize(k, self.qk_norm_eps)
        if self.temperature_tuning:  # Llama 4: sharpen NoPE attention as the context grows
            scale = torch.log(torch.floor((positions.float() + 1.0) / self.floor_scale) + 1.0) * self.attn_scale + 1.0
            q = (q * scale[:, :, None, None]).type_as(q)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:  # generation: store the new keys/values and attend over the cached ones
            k, v = cache.update(self.cache_layer, positions, k, v)
        gqa = q.shape[1] != k.shape[1]
        if mask is None:  # plain causal attention over the given tokens (training, scoring)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


# Cross-attention (Llama 3.2 Vision) -------------------------------------------------------------------
class CrossAttentionInputs(Protocol):
    """What a forward's gated cross-attention layers need for one batch (``llamaforge.vision.mllama`` builds it):
    each cross layer's image keys and values, computed once per request, and which of them each query sees."""

    @property
    def mask(self) -> Tensor:
        """[B, 1, T, S] bool, True = attend; every query row attends to at least one key."""
        ...

    @property
    def row_mask(self) -> Tensor:
        """[B, T, 1] in the activations' dtype: 1 where the token sees an image (Hugging Face's
        ``full_text_row_masked_out_mask``), 0 where it sees none and the block's feed-forward output is dropped."""
        ...

    def keys_values(self, layer: int) -> tuple[Tensor, Tensor]:
        """Keys and values [B, Hkv, S, D] of cross layer `layer` over the images (``CrossAttention.image_keys_values``);
        rows without images hold zeros, so the block leaves them unchanged."""
        ...


class CrossAttention(HeadProjections):
    """Attention from the text to the projected vision states; q and k are RMS-normalized per head, no RoPE."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps)

    def image_keys_values(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [N, Hkv, S, D] of projected vision states [N, S, dim]: computed once per image."""
        N, S, _ = images.shape
        k = self.k_norm(self.wk(images).view(N, S, -1, self.head_dim))
        v = self.wv(images).view(N, S, -1, self.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, T, -1, self.head_dim)).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                           enable_gqa=q.shape[1] != k.shape[1])  # fmt: skip
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class CrossAttentionBlock(nn.Module):
    """Llama 3.2 Vision's gated cross-attention layer: tanh gates on the attention and the feed-forward (zero at
    initialization, so the text model starts unchanged). Names follow Meta's ``CrossAttentionTransformerBlock``.

    As transformers computes it, a token that sees no image (before the first ``<|image|>``) still gets the
    attention output (over all of its request's image keys); only its feed-forward output is dropped. (Meta's
    reference drops both; conformance here is with transformers.)"""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = CrossAttention(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.gate_ffwd = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, cross: CrossAttentionInputs) -> Tensor:
        k, v = cross.keys_values(self.layer_id)
        h = x + self.gate_attn.tanh() * self.attention(self.attention_norm(x), k, v, cross.mask)
        return h + self.gate_ffwd.tanh() * (self.feed_forward(self.ffn_norm(h)) * cross.row_mask)


# Feed-forward --------------------------------------------------------------------------------------
class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked matrices in Meta's layout: w1, w3 [E, D, F]; w2 [E, F, D]."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))

    def forward(self, e: int, x: Tensor) -> Tensor:
        return (F.silu(x @ self.w1[e]) * (x @ self.w3[e])) @ self.w2[e]


class MoE(nn.Module):
    """Llama 4 mixture of experts: a shared expert for every token plus the top-k routed experts, whose
    inputs (not outputs) are scaled by the sigmoid of the router score."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.n_experts_per_token
        self.router = nn.Linear(config.dim, config.n_experts, bias=False)
        self.experts = GroupedExperts(config.n_experts, config.dim, config.expert_hidden_dim)
        self.shared_expert = FeedForward(config.dim, config.expert_hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        scores, chosen = torch.topk(self.router(x), self.top_k, dim=-1)  # [tokens, k]
        gates = torch.sigmoid(scores.float()).type_as(x)
        out = self.shared_expert(x)
        for e in torch.unique(chosen).tolist():  # only experts that received tokens do any work
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, self.experts(e, x[token] * gates[token, slot, None]))
        return out.view(shape)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.attention = Attention(config, layer_id)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward: nn.Module
        if config.is_moe_layer(layer_id):
            self.feed_forward = MoE(config)
        else:
            self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, mask: Tensor | None,
                cache: KVCacheView | None) -> Tensor:  # fmt: skip
        h = x + self.attention(self.attention_norm(x), cos, sin, positions, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Passing the (uninitialized) table skips nn.Embedding's own init: weights come from a checkpoint or
        # init_weights(), and random init of a meta tensor would import torch._dynamo (seconds) for nothing.
        self.tok_embeddings = nn.Embedding(
            config.token_rows, config.dim, _weight=torch.empty(config.token_rows, config.dim)
        )
        self.layers = nn.ModuleList(
            CrossAttentionBlock(config, i) if config.is_cross_layer(i) else TransformerBlock(config, i)
            for i in range(config.n_layers)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer("rope_freqs", rope_frequencies(config), persistent=False)
        self.tie_weights()

    # Construction helpers -------------------------------------------------------------------------
    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def _apply(self, fn, recurse=True):  # keep the RoPE frequencies in float32 through .to(dtype)
        super()._apply(fn, recurse)
        if self.rope_freqs.dtype != torch.float32 and self.rope_freqs.device.type != "meta":
            self.reset_buffers()
        return self

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers, e.g. after building on the meta device and loading weights."""
        device = next((p.device for p in self.parameters()), self.rope_freqs.device)
        self.rope_freqs = rope_frequencies(self.config).to(device)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """GPT-style init: N(0, std), residual projections scaled by 1/sqrt(2 * n_layers), norms at 1."""
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                residual = name.endswith(("wo.weight", "w2.weight", "experts.w2"))
                p.normal_(0.0, out_std if residual else std, generator=generator)
        self.reset_buffers()

    # Forward --------------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, *, cache: KVCacheView | None = None,
                attn_mask: Tensor | None = None, return_hidden: bool = False,
                input_embeds: Tensor | None = None, cross: CrossAttentionInputs | None = None) -> Tensor:  # fmt: skip
        """Logits [B, T, vocab] for tokens [B, T].

        ``input_embeds`` [B, T, dim] replaces the token embeddings (early-fused images: ``llamaforge.vision``).
        ``cross`` gives the gated cross-attention layers their image keys and values (Llama 3.2 Vision); without it
        those layers are skipped, as transformers skips them for text without images.

        A pipeline stage (``llamaforge.train.pipeline``) holds some of the blocks: without ``tok_embeddings`` it
        takes hidden states [B, T, dim] instead of tokens; without ``norm`` and ``output`` it returns hidden states.

        Without a cache: causal attention over ``tokens`` alone at positions 0..T-1 (training, scoring); an
        ``attn_mask`` [B, 1, T, T] (True = attend) may replace the causal mask, e.g. for packed documents.
        With ``cache`` (a ``KVCacheView``): the tokens sit at absolute positions ``input_pos`` [B, T] (or [T]);
        their keys and values go into the cache, and each attends to every cached position at or before its own.
        """
        B, T = tokens.shape[:2]
        device = tokens.device
        if input_embeds is not None:
            x = input_embeds
        else:
            x = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if cache is None:
            if input_pos is not None:
                raise ValueError("input_pos without a cache: pass cache= (llamaforge.inference.cache)")
            positions = torch.arange(T, device=device).expand(B, T)
            mask = attn_mask
            if self.config.attention_chunk_size is not None and mask is None:
                mask = _causal_mask(positions, torch.arange(T, device=device))
        else:
            if input_pos is None:
                raise ValueError("a cached forward needs input_pos, the positions of the tokens")
            positions = input_pos.expand(B, T) if input_pos.dim() == 1 else input_pos
            mask = _causal_mask(positions, torch.arange(cache.key_length, device=device))
        cos, sin = rope_cos_sin(self.rope_freqs, positions)
        chunked = self._chunked_mask(positions, mask)
        for layer in self.layers:
            if isinstance(layer, CrossAttentionBlock):
                if cross is not None:
                    x = layer(x, cross)
                continue
            layer_mask = chunked if (chunked is not None and layer.attention.use_rope) else mask
            x = layer(x, cos, sin, positions, layer_mask, cache)
        if self.norm is None:
            return x
        x = self.norm(x)
        return x if return_hidden or self.output is None else self.output(x)

    def _chunked_mask(self, positions: Tensor, mask: Tensor | None) -> Tensor | None:
        """Llama 4 local attention: RoPE layers see only keys in the query's chunk of the context."""
        size = self.config.attention_chunk_size
        if size is None or mask is None:
            return None
        keys = torch.arange(mask.shape[-1], device=positions.device)
        same_chunk = (positions[:, None, :, None] // size) == (keys // size)
        return mask & same_chunk


def _causal_mask(query_pos: Tensor, key_pos: Tensor) -> Tensor:
    """Boolean mask [B, 1, T, S]: a query attends to keys at positions at or before its own."""
    return key_pos[None, None, None, :] <= query_pos[:, None, :, None]


def build_model(config: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                init: bool = True) -> Transformer:  # fmt: skip
    """Build on the meta device (no memory), then materialize once on `device` and optionally initialize."""
    with torch.device("meta"):
        model = Transformer(config)
    if dtype is not None:
        model = model.to(dtype)
    model = model.to_empty(device=device or "cpu")
    model.tie_weights()
    if init:
        model.init_weights()
    else:
        model.reset_buffers()
    return model


def count_parameters(config: ModelConfig, active: bool = False) -> int:
    """Parameter count of a config, computed on the meta device (tied weights counted once).

    With ``active=True`` a mixture-of-experts layer counts only the shared and the top-k routed experts.
    """
    with torch.device("meta"):
        model = Transformer(config)
    total = sum(p.numel() for p in model.parameters())
    if active and config.n_experts:
        idle = config.n_experts - config.n_experts_per_token
        per_expert = 3 * config.dim * config.expert_hidden_dim
        total -= idle * per_expert * sum(config.is_moe_layer(i) for i in range(config.n_layers))
    return total
