"""llama.cpp's quantization mixes (``q4_k_m``, ``q8_0``, ...): which GGUF type each tensor of a llama model gets.

A mix is a default block type plus llama.cpp's per-tensor exceptions (``llama_tensor_get_type`` in
src/llama-quant.cpp, as ``llama_model_quantize`` applies them without an importance matrix), for the dense
llama models llamaforge writes:

- the output head, and the token embedding when the head is tied to it, is Q6_K in every mix but q8_0 (Q8_0
  when its rows do not fill whole blocks of the mix's type); an untied token embedding keeps the default;
- some mixes spend more bits on attn_v, ffn_down and attn_output (the sensitive ones): q4_k_m and q5_k_m
  make attn_v and ffn_down Q6_K in the layers ``_more_bits`` picks (the first and last eighth and every third
  layer between), q4_k_s makes the first 4 attn_v and the first eighth of ffn_down Q5_K, q3_k_m / q3_k_l /
  q2_k raise all three; a 70B-shaped model (80 layers, grouped-query attention) has Q5_K instead of
  Q3_K/Q4_K attn_v;
- a matrix whose rows are not a multiple of its type's block size falls back as llama.cpp does (Q2_K/Q3_K
  -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), and to F16 when not even 32 divides the rows
  (where llama.cpp refuses a 32-weight type outright);
- vectors (the norms) stay F32.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from gguf import GGMLQuantizationType, LlamaFileType

from .config import ModelConfig
from .gguf_quants import BLOCK_SIZES

Q = GGMLQuantizationType


@dataclass(frozen=True)
class Mix:
    """A llama.cpp file type: the block type most matrices get and the ``general.file_type`` it is stored as."""

    default: GGMLQuantizationType
    file_type: LlamaFileType


MIXES: dict[str, Mix] = {
    "q2_k": Mix(Q.Q2_K, LlamaFileType.MOSTLY_Q2_K),
    "q3_k_s": Mix(Q.Q3_K, LlamaFileType.MOSTLY_Q3_K_S),
    "q3_k_m": Mix(Q.Q3_K, LlamaFileType.MOSTLY_Q3_K_M),
    "q3_k_l": Mix(Q.Q3_K, LlamaFileType.MOSTLY_Q3_K_L),
    "q4_0": Mix(Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": Mix(Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q4_k_s": Mix(Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    "q4_k_m": Mix(Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "q5_0": Mix(Q.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q5_1": Mix(Q.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q5_k_s": Mix(Q.Q5_K, LlamaFileType.MOSTLY_Q5_K_S),
    "q5_k_m": Mix(Q.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "q6_k": Mix(Q.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "q8_0": Mix(Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}

# The type llama.cpp falls back to when a tensor's rows do not fill whole blocks.
_FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}

# ffn_down's rules cover a mixture of experts' stacked and shared expert down projections too (llama.cpp matches
# "ffn_down" in ffn_down_exps and ffn_down_shexp).
_LAYER_TENSOR = re.compile(
    r"layers\.(\d+)\.(attention\.wv|attention\.wo|feed_forward\.(?:shared_expert\.|experts\.)?w2)(?:\.weight)?"
)


def mix(name: str) -> Mix:
    """The mix called `name` (case-insensitive, e.g. ``"Q4_K_M"``); ValueError naming the choices otherwise."""
    found = MIXES.get(name.lower())
    if found is None:
        raise ValueError(f"unknown quantization mix {name!r}; choose one of {', '.join(MIXES)}")
    return found


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(config: ModelConfig, name: str, shape: Sequence[int], mix_name: str) -> GGMLQuantizationType:
    """The GGUF type llama.cpp's quantizer gives tensor `name` (a llamaforge name, e.g.
    ``layers.3.feed_forward.w2.weight``) of `shape` (torch order, ``[out, in]``) in the mix `mix_name`."""
    default = mix(mix_name).default
    key = mix_name.lower()
    if len(shape) < 2:
        return Q.F32
    row = shape[-1]
    kind = default
    if name == "output.weight" or (name == "tok_embeddings.weight" and config.tie_embeddings):
        if row % BLOCK_SIZES[default][0]:
            kind = Q.Q8_0
        elif default != Q.Q8_0:
            kind = Q.Q6_K
    elif m := _LAYER_TENSOR.fullmatch(name):
        layer, part, n = int(m.group(1)), m.group(2), config.n_layers
        part = "feed_forward.w2" if part.endswith("w2") else part
        if part == "attention.wv":
            kind = _attn_v_type(config, key, layer, default)
        elif part == "feed_forward.w2":
            kind = {
                "q2_k": Q.Q3_K,
                "q3_k_m": Q.Q5_K if layer < n // 16 else Q.Q4_K,
                "q3_k_l": Q.Q5_K,
                "q4_k_m": Q.Q6_K if _more_bits(layer, n) else default,
                "q5_k_m": Q.Q6_K if _more_bits(layer, n) else default,
                "q4_k_s": Q.Q5_K if layer < n // 8 else default,
            }.get(key, default)
        else:  # attention.wo
            kind = {"q2_k": Q.Q3_K, "q3_k_m": Q.Q4_K, "q3_k_l": Q.Q5_K}.get(key, default)
    if row % BLOCK_SIZES[kind][0]:
        kind = _FALLBACK.get(kind, Q.F16)
        if row % BLOCK_SIZES[kind][0]:
            kind = Q.F16
    return kind


def _attn_v_type(config: ModelConfig, key: str, layer: int, default: GGMLQuantizationType) -> GGMLQuantizationType:
    gqa = config.n_heads // config.kv_heads
    kind = default
    if key == "q2_k":
        kind = Q.Q4_K if gqa >= 4 else Q.Q3_K
    elif key == "q3_k_m":
        kind = Q.Q5_K if layer < 2 else Q.Q4_K
    elif key == "q3_k_l":
        kind = Q.Q5_K
    elif key in ("q4_k_m", "q5_k_m") and _more_bits(layer, config.n_layers):
        kind = Q.Q6_K
    elif key == "q4_k_s" and layer < 4:
        kind = Q.Q5_K
    if config.n_layers == 80 and gqa > 1 and kind in (Q.Q3_K, Q.Q4_K):  # llama.cpp's "70B" model type
        kind = Q.Q5_K
    return kind


__all__ = ["MIXES", "Mix", "mix", "tensor_type"]
