"""Model configuration: one dataclass and named presets for every released LLaMA text model.

Every preset is traceable to its source: the LLaMA paper (Table 2) for LLaMA 1, Meta's ``params.json``
files / ``llama_models/sku_list.py`` for later generations, and the model's ``config.json`` on the
Hugging Face hub for SmolLM2. Field names follow Meta's ``ModelArgs`` so that ``params.json`` maps 1:1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling (``apply_scaling`` in Meta's reference code)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads == n_heads)
    head_dim: int | None = None  # None: dim // n_heads
    hidden_dim: int | None = None  # explicit FFN width (HF/GGUF state it); None: Meta's formula below
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # Llama 4 mixture of experts: a sigmoid top-k router over routed experts plus one shared expert,
    # on every ``moe_every``-th layer (``interleave_moe_layer_step``); 0 experts means a dense model.
    n_experts: int = 0
    n_experts_per_token: int = 1
    moe_every: int = 1
    moe_hidden_dim: int | None = None  # None: Meta's MoE formula (ffn_exp * dim, auto-scaled)
    ffn_exp: float = 4.0
    # Llama 4 attention details
    use_qk_norm: bool = False  # L2-normalise q and k (no weight) on RoPE layers
    nope_layer_interval: int | None = None  # every n-th layer uses no positional encoding
    attn_temperature_tuning: bool = False  # scale q on NoPE layers for long contexts
    attn_floor_scale: float = 8192.0
    attn_scale: float = 0.1
    attention_chunk_size: int | None = None  # RoPE layers attend within chunks of this many tokens
    # Llama 3.2 Vision (Mllama): these layers are gated cross-attention blocks over the image (counted in n_layers,
    # as Hugging Face counts them); the token table has extra rows past vocab_size for prompt-only tokens
    # (``<|image|>``), which the output head cannot produce.
    cross_attention_layers: tuple[int, ...] = ()
    extra_token_rows: int = 0
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        problems = []
        for key in ("dim", "n_layers", "n_heads", "vocab_size"):
            if getattr(self, key) <= 0:
                problems.append(f"{key} must be positive, got {getattr(self, key)}")
        kv = self.n_kv_heads
        if self.n_heads > 0 and kv is not None and (kv <= 0 or self.n_heads % kv):
            problems.append(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.head_dim is None and self.n_heads > 0 and self.dim % self.n_heads:
            problems.append(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) or head_dim set")
        if self.n_experts and not 0 < self.n_experts_per_token <= self.n_experts:
            problems.append(f"n_experts_per_token ({self.n_experts_per_token}) must be in 1..{self.n_experts}")
        if self.head_dim is not None and self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        for key in ("head_dim", "hidden_dim", "ffn_dim_multiplier"):  # optional sizes: positive when given
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                problems.append(f"{key} must be positive, got {getattr(self, key)}")
        for key in ("multiple_of", "max_seq_len"):
            if getattr(self, key) <= 0:
                problems.append(f"{key} must be positive, got {getattr(self, key)}")
        bad_cross = [i for i in self.cross_attention_layers if not 0 <= i < self.n_layers]
        if bad_cross:
            problems.append(f"cross_attention_layers {bad_cross} outside 0..{self.n_layers - 1}")
        if self.extra_token_rows < 0:
            problems.append(f"extra_token_rows must not be negative, got {self.extra_token_rows}")
        if self.extra_token_rows and self.tie_embeddings:
            problems.append("extra_token_rows with tie_embeddings: the output head would have the extra rows")
        if problems:
            raise ValueError(f"invalid model config {self.name or ''}: " + "; ".join(problems))

    # Derived sizes ------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width exactly as Meta computes it: 2/3 * 4 * dim, times the multiplier, rounded up."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return _round_up(hidden, self.multiple_of)

    @property
    def expert_hidden_dim(self) -> int:
        """Width of each routed and the shared expert (Meta's ``MoE`` with ``auto_scale_F``)."""
        if self.moe_hidden_dim is not None:
            return self.moe_hidden_dim
        hidden = int(2 * int(self.ffn_exp * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        hidden = int(hidden / 2)  # auto_scale_F with capacity factor 1: active params match a dense layer
        return _round_up(hidden, self.multiple_of)

    @property
    def token_rows(self) -> int:
        """Rows of the token-embedding table: the vocabulary plus prompt-only tokens (Mllama's ``<|image|>``)."""
        return self.vocab_size + self.extra_token_rows

    def is_cross_layer(self, layer_id: int) -> bool:
        return layer_id in self.cross_attention_layers

    @property
    def kv_layers(self) -> int:
        """Layers with a KV cache: the self-attention ones (a cross-attention layer's keys are the image's)."""
        return self.n_layers - len(set(self.cross_attention_layers))

    def kv_layer(self, layer_id: int) -> int:
        """The KV-cache index of self-attention layer `layer_id` (cross-attention layers take none)."""
        return layer_id - sum(1 for i in set(self.cross_attention_layers) if i < layer_id)

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.n_experts > 0 and (layer_id + 1) % self.moe_every == 0

    def uses_rope(self, layer_id: int) -> bool:
        return not (self.nope_layer_interval and (layer_id + 1) % self.nope_layer_interval == 0)

    @property
    def is_llama4(self) -> bool:
        """Whether the model uses any of Llama 4's text features (experts, QK norm, NoPE layers, chunked attention,
        temperature tuning): checkpoint writers store it as a Llama 4 model."""
        return bool(self.n_experts or self.use_qk_norm or self.nope_layer_interval or self.attention_chunk_size
                    or self.attn_temperature_tuning)  # fmt: skip

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config fields: {', '.join(unknown)}")
        if isinstance(data.get("rope_scaling"), dict):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        if isinstance(data.get("cross_attention_layers"), list):  # JSON has no tuples
            data["cross_attention_layers"] = tuple(data["cross_attention_layers"])
        return cls(**data)


def _round_up(value: int, multiple: int) -> int:
    return multiple * ((value + multiple - 1) // multiple)


# Presets ----------------------------------------------------------------------------------------
_L31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
_L32_ROPE = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
_L4_ROPE = RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0, original_max_seq_len=8192)

_LLAMA1 = dict(vocab_size=32000, multiple_of=256, norm_eps=1e-6, max_seq_len=2048)
_LLAMA2 = dict(vocab_size=32000, multiple_of=256, norm_eps=1e-5, max_seq_len=4096)
_CODE = dict(multiple_of=256, norm_eps=1e-5, rope_theta=1e6, max_seq_len=16384)
_LLAMA3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, n_kv_heads=8)
_LLAMA4 = dict(
    dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, vocab_size=202048, multiple_of=2048,
    ffn_dim_multiplier=1.2, norm_eps=1e-5, rope_theta=500000.0, nope_layer_interval=4,
    attn_temperature_tuning=True, attention_chunk_size=8192, n_experts_per_token=1,
)  # fmt: skip

_PRESETS: dict[str, dict[str, Any]] = {
    # LLaMA 1 (paper, Table 2)
    "llama-7b": dict(dim=4096, n_layers=32, n_heads=32, **_LLAMA1),
    "llama-13b": dict(dim=5120, n_layers=40, n_heads=40, **_LLAMA1),
    "llama-33b": dict(dim=6656, n_layers=60, n_heads=52, **_LLAMA1),
    "llama-65b": dict(dim=8192, n_layers=80, n_heads=64, **_LLAMA1),
    # Llama 2 (Meta params.json; 70B uses GQA)
    "llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, **_LLAMA2),
    "llama-2-13b": dict(dim=5120, n_layers=40, n_heads=40, **_LLAMA2),
    "llama-2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                        **{**_LLAMA2, "multiple_of": 4096}),
    # Code Llama (rope theta 1e6, 16K context; 7B/13B/70B carry the 16 infilling tokens)
    "code-llama-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32016, **_CODE),
    "code-llama-13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32016, **_CODE),
    "code-llama-34b": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, vocab_size=32000,
                           ffn_dim_multiplier=1.0, **_CODE),
    "code-llama-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32016,
                           ffn_dim_multiplier=1.3, **{**_CODE, "multiple_of": 4096, "max_seq_len": 4096}),
    # Llama 3 / 3.1 / 3.2 / 3.3 (llama_models/sku_list.py)
    "llama-3-8b": dict(dim=4096, n_layers=32, n_heads=32, ffn_dim_multiplier=1.3, multiple_of=1024,
                       max_seq_len=8192, **_LLAMA3),
    "llama-3-70b": dict(dim=8192, n_layers=80, n_heads=64, ffn_dim_multiplier=1.3, multiple_of=4096,
                        max_seq_len=8192, **_LLAMA3),
    "llama-3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, ffn_dim_multiplier=1.3, multiple_of=1024,
                         max_seq_len=131072, rope_scaling=_L31_ROPE, **_LLAMA3),
    "llama-3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, ffn_dim_multiplier=1.3, multiple_of=4096,
                          max_seq_len=131072, rope_scaling=_L31_ROPE, **_LLAMA3),
    "llama-3.1-405b": dict(dim=16384, n_layers=126, n_heads=128, ffn_dim_multiplier=1.2, multiple_of=4096,
                           max_seq_len=131072, rope_scaling=_L31_ROPE, **_LLAMA3),
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, ffn_dim_multiplier=1.5, multiple_of=256,
                         max_seq_len=131072, rope_scaling=_L32_ROPE, tie_embeddings=True, **_LLAMA3),
    "llama-3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, ffn_dim_multiplier=1.0, multiple_of=256,
                         max_seq_len=131072, rope_scaling=_L32_ROPE, tie_embeddings=True, **_LLAMA3),
    "llama-3.3-70b": dict(dim=8192, n_layers=80, n_heads=64, ffn_dim_multiplier=1.3, multiple_of=4096,
                          max_seq_len=131072, rope_scaling=_L31_ROPE, **_LLAMA3),
    # Llama 4 (text part; Meta params.json of the 17B-active models)
    "llama-4-scout-17b-16e": dict(n_experts=16, moe_every=1, use_qk_norm=True, rope_scaling=_L4_ROPE,
                                  max_seq_len=10485760, **_LLAMA4),
    "llama-4-maverick-17b-128e": dict(n_experts=128, moe_every=2, use_qk_norm=False, max_seq_len=1048576,
                                      **_LLAMA4),
    # SmolLM2 (HuggingFaceTB/SmolLM2-135M config.json): the built-in default model
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152,
                         rope_theta=100000.0, norm_eps=1e-5, max_seq_len=8192, tie_embeddings=True),
    # llama2.c's TinyStories 15M shape (pretraining benchmark)
    "stories15m": dict(dim=288, n_layers=6, n_heads=6, hidden_dim=768, vocab_size=32000, max_seq_len=256,
                       norm_eps=1e-5, tie_embeddings=True),
    # Tiny shapes for tests and demos
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, vocab_size=512, max_seq_len=256),
    "tiny-mha": dict(dim=64, n_layers=2, n_heads=4, hidden_dim=160, vocab_size=512, max_seq_len=256),
    "tiny-moe": dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=160, vocab_size=512,
                     max_seq_len=256, n_experts=4, n_experts_per_token=1, moe_every=2, moe_hidden_dim=96,
                     use_qk_norm=True, nope_layer_interval=4, attn_temperature_tuning=True,
                     attention_chunk_size=16),
}  # fmt: skip

# Chat/instruct variants share their base model's shape.
for _base in ("llama-2-7b", "llama-2-13b", "llama-2-70b"):
    _PRESETS[_base + "-chat"] = _PRESETS[_base]
for _base in ("code-llama-7b", "code-llama-13b", "code-llama-34b", "code-llama-70b"):
    _PRESETS[_base + "-instruct"] = _PRESETS[_base]
for _base in ("llama-3-8b", "llama-3-70b", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b",
              "llama-3.2-1b", "llama-3.2-3b", "llama-4-scout-17b-16e", "llama-4-maverick-17b-128e",
              "smollm2-135m"):  # fmt: skip
    _PRESETS[_base + "-instruct"] = _PRESETS[_base]
_PRESETS["llama-3.3-70b-instruct"] = _PRESETS.pop("llama-3.3-70b")


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """Return the named preset, e.g. ``get_preset("llama-2-7b")``, with optional field overrides."""
    key = name.lower()
    if key not in _PRESETS:
        import difflib

        close = difflib.get_close_matches(key, _PRESETS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown model preset {name!r}{hint} (see llamaforge.config.preset_names())")
    return ModelConfig(name=key, **{**_PRESETS[key], **overrides})
