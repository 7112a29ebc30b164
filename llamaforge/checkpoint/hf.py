"""Hugging Face checkpoints: a directory with ``config.json`` and ``*.safetensors`` (single or sharded).

Architectures: ``LlamaForCausalLM`` (LLaMA 1-3, Code Llama), and Llama 4's ``Llama4ForCausalLM`` and
``Llama4ForConditionalGeneration`` (its language model: ``language_model.model.*``), as transformers and Meta's
conversion script write them: expert weights fused per layer (``experts.gate_up_proj`` [E, dim, 2 * hidden], the
gate's columns first, and ``experts.down_proj`` [E, hidden, dim], Meta's own layout), a ``router`` and a
``shared_expert``, dense and MoE layers interleaved (``moe_layers`` / ``interleave_moe_layer_step``), NoPE layers
(``no_rope_layers``), chunked attention on the RoPE layers, QK norm and attention temperature tuning. And Llama 3.2
Vision's ``MllamaForConditionalGeneration``: its language model (self-attention layers and the gated cross-attention
layers of ``cross_attention_layers``, a token table with 8 rows past the vocabulary for ``<|image|>``) loads here;
its vision tensors are read by ``llamaforge.vision.mllama`` through ``read_prefixed``. Both key layouts are
read: ``language_model.model.*`` / ``vision_model.*`` (transformers 4.x, and what 5.x writes) and 5.x's in-memory
``model.language_model.*`` / ``model.vision_model.*``.

Hugging Face's Llama stores the rows of q and k permuted so that rotary embeddings can rotate the two
halves of each head (``rotate_half``); llamaforge rotates adjacent pairs as Meta does, so q and k are
un-permuted on read and permuted again on write. Llama 4's transformers code rotates adjacent pairs itself, so
its q and k are stored as Meta's. Tensors are read lazily through ``safetensors.safe_open``, whose tensors are
backed by a private memory map of the file: loading a checkpoint in its stored dtype never holds a second copy of
the model (the fused expert tensors are split into views of it).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ModelConfig, RopeScaling
from ..errors import CheckpointError
from . import check_tensors

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_SHARD_BYTES = 5_000_000_000  # Hugging Face's default shard size ("5GB")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Llama4ForCausalLM", "Llama4ForConditionalGeneration",
                           "MllamaForConditionalGeneration")  # fmt: skip
MLLAMA = "MllamaForConditionalGeneration"
MLLAMA_EXTRA_ROWS = 8  # transformers' MllamaTextModel: embed_tokens has vocab_size + 8 rows (<|image|> is the first)
_LLAMA4_TYPES = {"llama4": "Llama4ForConditionalGeneration", "llama4_text": "Llama4ForCausalLM"}

# Hugging Face name -> llamaforge name; {i} is the layer index.
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
# Mllama's gated cross-attention layers (the norms and the MLP are named as in the self-attention layers).
_CROSS_LAYER_NAMES = {
    "cross_attn.q_proj.weight": "attention.wq.weight",
    "cross_attn.k_proj.weight": "attention.wk.weight",
    "cross_attn.v_proj.weight": "attention.wv.weight",
    "cross_attn.o_proj.weight": "attention.wo.weight",
    "cross_attn.q_norm.weight": "attention.q_norm.weight",
    "cross_attn.k_norm.weight": "attention.k_norm.weight",
    "cross_attn_attn_gate": "gate_attn",
    "cross_attn_mlp_gate": "gate_ffwd",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
# Llama 4's text layers; "experts.gate_up_proj" is the fused pair below, split on read and joined on write.
_LLAMA4_LAYER_NAMES = {
    **{k: v for k, v in _LAYER_NAMES.items() if not k.startswith("mlp.")},
    "feed_forward.gate_proj.weight": "feed_forward.w1.weight",
    "feed_forward.up_proj.weight": "feed_forward.w3.weight",
    "feed_forward.down_proj.weight": "feed_forward.w2.weight",
    "feed_forward.router.weight": "feed_forward.router.weight",
    "feed_forward.shared_expert.gate_proj.weight": "feed_forward.shared_expert.w1.weight",
    "feed_forward.shared_expert.up_proj.weight": "feed_forward.shared_expert.w3.weight",
    "feed_forward.shared_expert.down_proj.weight": "feed_forward.shared_expert.w2.weight",
    "feed_forward.experts.down_proj": "feed_forward.experts.w2",
}
_GATE_UP = "feed_forward.experts.gate_up_proj"
_GATE_UP_PARTS = ("feed_forward.experts.w1", "feed_forward.experts.w3")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_OUR_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
# Buffers some old exports carry; they are recomputed, never loaded.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# The image side of Llama4ForConditionalGeneration and Mllama checkpoints (either key layout: transformers 5 puts
# Mllama's under ``model.``): not the language model's; ``llamaforge.vision`` reads them (``read_prefixed``), as
# llama.cpp keeps them out of the text model's GGUF (in a separate mmproj file).
VISION_PREFIXES = tuple(
    f"{root}{part}" for root in ("", "model.") for part in ("vision_model.", "multi_modal_projector.")
)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# Detection and config ----------------------------------------------------------------------------
def detect(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / CONFIG_FILE).is_file() or any(path.glob("*.safetensors")))


def read_json(file: Path, what: str) -> dict[str, Any]:
    """Parse a JSON object from `file`, with errors that name the file and the problem."""
    if not file.is_file():
        raise CheckpointError(f"{file.parent}: missing {file.name} ({what})")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise CheckpointError(f"{file}: invalid JSON: nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{file}: not a UTF-8 text file ({exc.reason})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def read_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    file = path / CONFIG_FILE
    data = read_json(file, "the Hugging Face model configuration")
    architectures = data.get("architectures") or []
    model_type = data.get("model_type")
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise CheckpointError(f"{file}: 'architectures' must be a list of strings, got {architectures!r}")
    known = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
    if not known and not architectures and model_type in ("llama", "mllama", *_LLAMA4_TYPES):
        known = [{**_LLAMA4_TYPES, "mllama": MLLAMA}.get(model_type, "LlamaForCausalLM")]
    if not known:
        raise CheckpointError(
            f"{file}: unsupported architecture {architectures or model_type!r} "
            f"(llamaforge reads {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    name = data.get("_name_or_path") or path.name
    if known[0] == "Llama4ForConditionalGeneration":
        text = data.get("text_config")
        if not isinstance(text, dict):
            raise CheckpointError(f"{file}: a Llama4ForConditionalGeneration config needs a 'text_config' object")
        config = config_from_hf_llama4(text, file, name)
    elif known[0] == "Llama4ForCausalLM":
        config = config_from_hf_llama4(data, file, name)
    elif known[0] == MLLAMA:
        config = config_from_hf_mllama(data, file, name)
    else:
        config = config_from_hf(data, file, name=name)
    config.extra["architecture"] = known[0]
    return config


def config_from_hf(data: Mapping[str, Any], file: Path | str, name: str = "") -> ModelConfig:
    """Translate a LlamaConfig dictionary into a ModelConfig; `file` is named in errors."""
    try:
        return _config_from_hf(data, file, name)
    except CheckpointError:
        raise
    except (TypeError, ValueError, ArithmeticError) as exc:  # int("x"), int(None), int(inf), n // 0, ModelConfig's
        raise CheckpointError(f"{file}: {exc}") from None


def _config_from_hf(data: Mapping[str, Any], file: Path | str, name: str) -> ModelConfig:
    def need(key: str) -> Any:
        if data.get(key) is None:
            raise CheckpointError(f"{file}: missing field {key!r}")
        return data[key]

    for key, allowed in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if key in data and data[key] != allowed:
            raise CheckpointError(f"{file}: {key}={data[key]!r} is not supported (LLaMA uses {allowed!r})")
    dim, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{file}: rope parameters must be an object, found {rope!r}")
    rope_theta = rope.get("rope_theta", data.get("rope_theta", 10000.0))
    head_dim = data.get("head_dim")
    extra = {key: data[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if data.get(key) is not None}
    dtype = data.get("dtype") or data.get("torch_dtype")
    if dtype:
        extra["dtype"] = dtype
    return ModelConfig(
        dim=dim,
        n_layers=int(need("num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(data.get("num_key_value_heads") or n_heads),
        vocab_size=int(need("vocab_size")),
        head_dim=None if head_dim in (None, dim // n_heads) else int(head_dim),
        hidden_dim=int(need("intermediate_size")),
        norm_eps=float(data.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=_rope_scaling_from_hf(rope, file),
        max_seq_len=int(data.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(data.get("tie_word_embeddings", False)),
        name=str(name),
        extra=extra,
    )


def config_from_hf_llama4(data: Mapping[str, Any], file: Path | str, name: str = "") -> ModelConfig:
    """Translate a Llama4TextConfig dictionary (``text_config`` of Llama4ForConditionalGeneration) into a
    ModelConfig. Per-layer lists (``moe_layers``, ``no_rope_layers``, ``layer_types``) must follow the regular
    patterns llamaforge's config expresses; anything else is refused naming the field."""
    # Llama4TextConfig's defaults: the dense layers' width is intermediate_size_mlp, head_dim 128 when unstated.
    dense = data.get("intermediate_size_mlp", data.get("intermediate_size"))
    base = config_from_hf({**data, "intermediate_size": dense, "head_dim": data.get("head_dim", 128)}, file, name)
    n = base.n_layers
    experts = int(data.get("num_local_experts") or 0)
    step = int(data.get("interleave_moe_layer_step") or 1)
    moe_layers = data.get("moe_layers")
    if moe_layers is not None:
        if not isinstance(moe_layers, list) or not all(isinstance(i, int) for i in moe_layers):
            raise CheckpointError(f"{file}: moe_layers must be a list of layer indices, got {moe_layers!r}")
        if not moe_layers:
            experts = 0
        elif moe_layers != list(range(step - 1, n, step)):
            every = moe_layers[0] + 1
            if moe_layers != list(range(every - 1, n, every)):
                raise CheckpointError(f"{file}: moe_layers {moe_layers} are not every n-th layer; llamaforge supports "
                                      "mixture-of-experts layers at a regular interval")  # fmt: skip
            step = every
    interval = int(data.get("no_rope_layer_interval") or 4)
    no_rope = data.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    if not isinstance(no_rope, list) or len(no_rope) < n:
        raise CheckpointError(f"{file}: no_rope_layers must list a 0/1 flag for each of the {n} layers, "
                              f"got {no_rope!r}")  # fmt: skip
    nope = [i for i in range(n) if not no_rope[i]]
    if not nope:
        interval_or_none: int | None = None
    else:
        every = nope[0] + 1
        if nope != list(range(every - 1, n, every)):
            raise CheckpointError(f"{file}: no_rope_layers {no_rope[:n]} do not mark every n-th layer; llamaforge "
                                  "supports NoPE layers at a regular interval")  # fmt: skip
        interval_or_none = every
    chunk = data.get("attention_chunk_size")
    layer_types = data.get("layer_types")
    if chunk is not None and layer_types is not None:
        chunked = [i for i, kind in enumerate(layer_types[:n]) if kind == "chunked_attention"]
        rope_layers = [i for i in range(n) if no_rope[i]]
        if not chunked:
            chunk = None
        elif chunked != rope_layers:
            raise CheckpointError(f"{file}: layer_types puts chunked attention on layers {chunked}, not on the RoPE "
                                  f"layers {rope_layers} as Llama 4 does")  # fmt: skip
    try:
        return base.replace(
            n_experts=experts,
            n_experts_per_token=int(data.get("num_experts_per_tok") or 1),
            moe_every=step,
            moe_hidden_dim=int(data["intermediate_size"]) if experts else None,
            use_qk_norm=bool(data.get("use_qk_norm", True)),
            nope_layer_interval=interval_or_none,
            attn_temperature_tuning=bool(data.get("attn_temperature_tuning", True)),
            attn_floor_scale=float(data.get("floor_scale", 8192)),
            attn_scale=float(data.get("attn_scale", 0.1)),
            attention_chunk_size=int(chunk) if chunk else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{file}: {exc}") from None


def config_from_hf_mllama(data: Mapping[str, Any], file: Path | str, name: str = "") -> ModelConfig:
    """The language model of an MllamaConfig: its ``text_config`` with the cross-attention layers (counted in
    ``num_hidden_layers``) and the token table's extra rows; ``extra["image_token_id"]`` is ``<|image|>``'s id."""
    text = data.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{file}: a {MLLAMA} config needs a 'text_config' object")
    base = config_from_hf(text, file, name)
    layers = text.get("cross_attention_layers")
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise CheckpointError(f"{file}: text_config.cross_attention_layers must be a list of layer indices, "
                              f"got {layers!r}")  # fmt: skip
    image_token = data.get("image_token_index", data.get("image_token_id", base.vocab_size))
    if not isinstance(image_token, int) or not 0 <= image_token < base.vocab_size + MLLAMA_EXTRA_ROWS:
        raise CheckpointError(f"{file}: image_token_index {image_token!r} is outside the token table "
                              f"(0..{base.vocab_size + MLLAMA_EXTRA_ROWS - 1})")  # fmt: skip
    try:
        config = base.replace(cross_attention_layers=tuple(layers), extra_token_rows=MLLAMA_EXTRA_ROWS)
    except ValueError as exc:
        raise CheckpointError(f"{file}: {exc}") from None
    config.extra["image_token_id"] = image_token
    return config


def _rope_scaling_from_hf(rope: Mapping[str, Any], file: Path | str) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise CheckpointError(f"{file}: rope_type {kind!r} is not supported (llamaforge implements 'llama3')")
    try:
        return RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_seq_len=int(rope["original_max_position_embeddings"]),
        )
    except KeyError as exc:
        raise CheckpointError(f"{file}: llama3 rope scaling lacks {exc.args[0]!r}") from None


def config_to_hf(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """A LlamaForCausalLM config.json for `config` (the legacy ``rope_theta``/``rope_scaling`` keys, which
    every transformers version reads)."""
    data: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.dim_per_head,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    s = config.rope_scaling
    if s is not None:
        data["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_seq_len,
        }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.extra.get(key) is not None:
            data[key] = config.extra[key]
    return data


def config_to_hf_llama4(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """A Llama4ForCausalLM config.json (``model_type`` llama4_text) for `config`, every per-layer list spelled out."""
    data = config_to_hf(config, dtype)
    n = config.n_layers
    moe = [i for i in range(n) if config.is_moe_layer(i)]
    floor = config.attn_floor_scale
    data.update({
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "intermediate_size": config.expert_hidden_dim if config.n_experts else config.ffn_hidden_dim,
        "intermediate_size_mlp": config.ffn_hidden_dim,
        "head_dim": config.dim_per_head,
        "num_local_experts": config.n_experts,
        "num_experts_per_tok": config.n_experts_per_token,
        "interleave_moe_layer_step": config.moe_every,
        "moe_layers": moe,
        "use_qk_norm": config.use_qk_norm,
        "no_rope_layers": [int(config.uses_rope(i)) for i in range(n)],
        "no_rope_layer_interval": config.nope_layer_interval or n + 1,
        "attention_chunk_size": config.attention_chunk_size,
        "attn_temperature_tuning": config.attn_temperature_tuning,
        "floor_scale": int(floor) if float(floor).is_integer() else floor,
        "attn_scale": config.attn_scale,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
    })  # fmt: skip
    for key in ("mlp_bias",):
        data.pop(key, None)
    return data


# q/k row order ----------------------------------------------------------------------------------
def permute_to_hf(w: Tensor, n_heads: int) -> Tensor:
    """Adjacent-pair rows (x0, x1, x0, x1, ...) of each head -> halves (x0, x0, ..., x1, x1, ...)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: Tensor, n_heads: int) -> Tensor:
    """Inverse of ``permute_to_hf``."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# Reading ----------------------------------------------------------------------------------------
def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order when sharded."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: missing or empty 'weight_map'")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index}: lists shard {file.name}, which is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        found = f" (found {', '.join(others)}; convert them to safetensors)" if others else ""
        raise CheckpointError(f"{path}: no *.safetensors weight files{found}")
    return files


def _prefixes(architecture: str | None) -> tuple[str, ...]:
    if architecture == MLLAMA:  # language_model.model.* + language_model.lm_head (4.x), or 5.x's layout
        return ("language_model.", "model.language_model.", "")
    return ("language_model.",) if architecture == "Llama4ForConditionalGeneration" else ("",)


def read_tensors(path: str | os.PathLike, config: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    path = Path(path)
    layout = _Layout(config, _prefixes(config.extra.get("architecture")))
    q_rows, k_rows = config.n_heads * config.dim_per_head, config.kv_heads * config.dim_per_head
    multimodal = config.extra.get("architecture") in ("Llama4ForConditionalGeneration", MLLAMA)
    for file in weight_files(path):
        with _open(file) as handle:
            names = list(handle.keys())
        for hf_name in names:
            if _IGNORED.fullmatch(hf_name):
                continue
            if multimodal and hf_name.startswith(VISION_PREFIXES):
                continue
            name = layout.from_hf(hf_name)
            if name is None:
                raise CheckpointError(f"{file}: unexpected tensor {hf_name!r} (not a weight of "
                                      f"{config.extra.get('architecture', layout.architecture)})")  # fmt: skip
            # One short-lived handle per tensor: its memory map then lives only as long as the tensor does,
            # so a tensor the loader converts (dtype, device, permutation) leaves no mapped pages behind.
            with _open(file) as handle:
                try:
                    tensor = handle.get_tensor(hf_name)
                except Exception as exc:
                    raise CheckpointError(f"{file}: cannot read tensor {hf_name!r} ({exc})") from None
            if isinstance(name, tuple):  # experts.gate_up_proj [E, dim, 2 * hidden]: the gate's columns first
                if tensor.dim() != 3 or tensor.shape[-1] % 2:
                    raise CheckpointError(f"{file}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, expected "
                                          "[experts, dim, 2 * expert hidden size]")  # fmt: skip
                gate, up = tensor.chunk(2, dim=-1)
                yield name[0], gate
                yield name[1], up
                del tensor, gate, up
                continue
            # A wrong row count is left for the loader's shape check to report.
            if layout.permute_qk and tensor.dim() == 2 and not layout.is_cross(name):  # cross-attention has no RoPE
                if name.endswith("attention.wq.weight") and tensor.shape[0] == q_rows:
                    tensor = permute_from_hf(tensor, config.n_heads)
                elif name.endswith("attention.wk.weight") and tensor.shape[0] == k_rows:
                    tensor = permute_from_hf(tensor, config.kv_heads)
            yield name, tensor
            del tensor


def read_prefixed(path: str | os.PathLike, prefixes: tuple[str, ...]) -> Iterator[tuple[str, Path, Tensor]]:
    """The tensors of a checkpoint directory whose names start with one of `prefixes` (an image model's encoder),
    as (name, file, tensor), read lazily."""
    for file in weight_files(Path(path)):
        with _open(file) as handle:
            names = list(handle.keys())
        for name in (n for n in names if n.startswith(prefixes)):
            with _open(file) as handle:
                try:
                    tensor = handle.get_tensor(name)
                except Exception as exc:
                    raise CheckpointError(f"{file}: cannot read tensor {name!r} ({exc})") from None
            yield name, file, tensor
            del tensor


def _open(file: Path) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError for bad headers
        raise CheckpointError(f"{file}: not a readable safetensors file, perhaps truncated ({exc})") from None


class _Layout:
    """Where an architecture keeps llamaforge's tensors: the text model's prefix, the per-layer names, and whether
    q and k are stored permuted (``rotate_half``)."""

    def __init__(self, config: ModelConfig, prefixes: tuple[str, ...] = ("",)) -> None:
        self.llama4 = config.is_llama4
        self.config = config
        self.architecture = "Llama4ForCausalLM" if self.llama4 else "LlamaForCausalLM"
        self.layer_names = _LLAMA4_LAYER_NAMES if self.llama4 else _LAYER_NAMES
        if config.cross_attention_layers:
            self.architecture = MLLAMA
            self.layer_names = {**_LAYER_NAMES, **_CROSS_LAYER_NAMES}
        self.to_hf_layer = {ours: theirs for theirs, ours in self.layer_names.items()}
        self.permute_qk = not self.llama4
        self.prefixes = prefixes  # "language_model." for Llama4ForConditionalGeneration

    def is_cross(self, name: str) -> bool:
        """Whether our tensor `name` belongs to a cross-attention layer."""
        match = _OUR_LAYER.fullmatch(name)
        return bool(match) and self.config.is_cross_layer(int(match.group(1)))

    def from_hf(self, name: str) -> str | tuple[str, str] | None:
        """Our name for the HF tensor `name` (a pair for the fused expert gate/up), or None when unknown."""
        for prefix in self.prefixes:
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if prefix == "model.language_model.":  # transformers 5: model.language_model.{layers,embed_tokens,norm}
                rest = "model." + rest
            if rest in _GLOBAL_NAMES:
                return _GLOBAL_NAMES[rest]
            match = _HF_LAYER.fullmatch(rest)
            if match and match.group(2) in self.layer_names:
                layer = int(match.group(1))
                cross = match.group(2) in _CROSS_LAYER_NAMES
                if cross != self.config.is_cross_layer(layer) and not match.group(2).startswith(_SHARED_LAYER_PARTS):
                    return None  # a cross-attention tensor in a self-attention layer or the other way round
                return f"layers.{layer}.{self.layer_names[match.group(2)]}"
            if match and self.llama4 and match.group(2) == _GATE_UP:
                w1, w3 = _GATE_UP_PARTS
                return f"layers.{match.group(1)}.{w1}", f"layers.{match.group(1)}.{w3}"
        return None

    def to_hf(self, name: str) -> str:
        prefix = self.prefixes[0]
        if name in _TO_HF_GLOBAL:
            return prefix + _TO_HF_GLOBAL[name]
        match = _OUR_LAYER.fullmatch(name)
        if match and match.group(2) in self.to_hf_layer:
            return f"{prefix}model.layers.{match.group(1)}.{self.to_hf_layer[match.group(2)]}"
        if match and match.group(2) in _GATE_UP_PARTS:
            return f"{prefix}model.layers.{match.group(1)}.{_GATE_UP}"
        raise CheckpointError(f"tensor {name!r} has no Hugging Face {self.architecture} counterpart")


_TO_HF_GLOBAL = {ours: theirs for theirs, ours in _GLOBAL_NAMES.items()}
_SHARED_LAYER_PARTS = ("mlp.", "input_layernorm.", "post_attention_layernorm.")  # in both kinds of Mllama layer


# Writing ----------------------------------------------------------------------------------------
def write(path: str | os.PathLike, config: ModelConfig, tensors: Mapping[str, Tensor], tokenizer: Any = None,
          dtype: torch.dtype | None = None) -> None:  # fmt: skip
    """Write config.json, generation_config.json and model.safetensors (sharded above 5 GB), atomically."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from . import atomic_output

    path = Path(path)
    check_tensors(path, config, tensors)
    layout = _Layout(config)
    dtype = _resolve_dtype(dtype)
    ordered = [(name, tensors[name]) for name in tensors if not (config.tie_embeddings and name == "output.weight")]
    ordered = [(n, t) for n, t in ordered if not n.endswith(_GATE_UP_PARTS[1])]  # written with its gate half
    stored = dtype or next((t.dtype for _, t in ordered if t.dtype.is_floating_point), torch.float32)
    shards = _plan_shards(ordered, dtype)
    with atomic_output(path, is_dir=True) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        progress = tqdm(total=len(ordered), desc=f"writing {path.name}", unit="tensor", disable=None)
        for number, shard in enumerate(shards, 1):
            file = SINGLE_FILE if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            out: dict[str, Tensor] = {}
            for name, tensor in shard:
                hf_name = layout.to_hf(name)
                if name.endswith(_GATE_UP_PARTS[0]):  # experts w1 and w3 -> gate_up_proj [E, dim, 2 * hidden]
                    tensor = torch.cat([tensor, tensors[name[: -len(_GATE_UP_PARTS[0])] + _GATE_UP_PARTS[1]]], -1)
                tensor = tensor.detach().to("cpu", dtype if dtype and tensor.dtype.is_floating_point else None)
                if layout.permute_qk and name.endswith("attention.wq.weight"):
                    tensor = permute_to_hf(tensor, config.n_heads)
                elif layout.permute_qk and name.endswith("attention.wk.weight"):
                    tensor = permute_to_hf(tensor, config.kv_heads)
                out[hf_name] = tensor
                weight_map[hf_name] = file
                total += tensor.numel() * tensor.element_size()
            save_file(_unshared(out), str(tmp / file), metadata={"format": "pt"})
            progress.update(len(shard))
            del out
        progress.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        hf_config = config_to_hf_llama4(config, stored) if layout.llama4 else config_to_hf(config, stored)
        _token_ids_from_tokenizer(hf_config, tokenizer)
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = {key: hf_config[key] for key in ("bos_token_id", "eos_token_id") if key in hf_config}
        stops = sorted(set(getattr(tokenizer, "stop_ids", None) or ()) - {generation.get("eos_token_id")})
        if stops:  # end of turn as well as end of text (Llama 3's <|eot_id|>): serving engines stop on every one
            generation["eos_token_id"] = [generation["eos_token_id"], *stops] if "eos_token_id" in generation else stops
        (tmp / "generation_config.json").write_text(json.dumps({"_from_model_config": True, **generation}, indent=2))
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _plan_shards(tensors: list[tuple[str, Tensor]], dtype: torch.dtype | None) -> list[list[tuple[str, Tensor]]]:
    shards: list[list[tuple[str, Tensor]]] = [[]]
    size = 0
    for name, tensor in tensors:
        item = dtype.itemsize if dtype and tensor.dtype.is_floating_point else tensor.element_size()
        nbytes = tensor.numel() * item * (2 if name.endswith(_GATE_UP_PARTS[0]) else 1)  # written joined with w3
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += nbytes
    return shards


def _unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses tensors that share memory; give each its own contiguous copy where needed."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def _token_ids_from_tokenizer(data: dict[str, Any], tokenizer: Any) -> None:
    """Fill bos/eos token ids from the tokenizer when the config does not state them."""
    if tokenizer is None:
        return
    for key, attrs in (("bos_token_id", ("bos_id", "bos_token_id")), ("eos_token_id", ("eos_id", "eos_token_id"))):
        if key in data:
            continue
        for attr in attrs:
            value = getattr(tokenizer, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                data[key] = value
                break


__all__ = ["config_from_hf", "config_from_hf_llama4", "config_from_hf_mllama", "config_to_hf", "config_to_hf_llama4",
           "detect", "permute_from_hf", "permute_to_hf", "read_config", "read_prefixed", "read_tensors",
           "write"]  # fmt: skip
