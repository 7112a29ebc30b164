"""Meta checkpoints: a directory with ``params.json``, ``consolidated.NN.pth`` (one file per model-parallel
rank) and usually ``tokenizer.model``.

Tensor names are already llamaforge's. The ``.pth`` files are opened only with
``torch.load(weights_only=True, mmap=True)``: nothing but tensors is unpickled, and the files are read
through a memory map whose pages are dropped once a tensor has been converted or merged, so loading peaks
near one copy of the model. Multi-file checkpoints are merged along
the dimension each tensor was split on: column-parallel matrices (wq, wk, wv, w1, w3, output) on their
rows, row-parallel ones (wo, w2) on their columns; the embedding on its columns in LLaMA 1/2
(``ParallelEmbedding``) and on its rows from Llama 3 on (``VocabParallelEmbedding``); norms are
replicated. Meta's format has no field for the FFN width: its code derives it from ``multiple_of`` and
``ffn_dim_multiplier``, which the writer chooses so that the formula reproduces the model's width.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import pickle
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ModelConfig, RopeScaling
from ..errors import CheckpointError
from . import check_tensors
from .hf import read_json

PARAMS_FILE = "params.json"
TOKENIZER_FILE = "tokenizer.model"
_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")  # split on dim 1
_COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
                    "feed_forward.w3.weight", "output.weight")  # fmt: skip
_IGNORED = {"rope.freqs"}  # LLaMA 1/2 files carry the RoPE table; it is recomputed


def detect(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / PARAMS_FILE).is_file() or bool(shard_files(path)))


def shard_files(path: Path) -> list[Path]:
    return sorted((p for p in path.glob("consolidated.*.pth") if _SHARD.fullmatch(p.name)),
                  key=lambda p: int(_SHARD.fullmatch(p.name).group(1)))  # type: ignore[union-attr]  # fmt: skip


def _load_shard(file: Path) -> dict[str, Tensor]:
    """Open a .pth lazily (memory-mapped), unpickling tensors only."""
    try:
        data = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{file}: holds objects other than tensors, which llamaforge refuses to unpickle "
            f"(torch.load weights_only=True: {first})"
        ) from None
    except Exception as exc:  # a damaged pickle raises anything from KeyError (a bad memo index) to RuntimeError
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint, perhaps truncated or damaged "
                              f"({type(exc).__name__}: {exc})") from None  # fmt: skip
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise CheckpointError(f"{file}: expected a dictionary of tensors, found {type(data).__name__}")
    return data


def read_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    file = path / PARAMS_FILE
    params = read_json(file, "Meta's model parameters")
    if "moe_args" in params or "vision_args" in params:
        raise CheckpointError(f"{file}: Llama 4 Meta checkpoints are not supported; convert it to Hugging Face first")
    shards = shard_files(path)
    if not shards:
        raise CheckpointError(f"{path}: no consolidated.NN.pth weight files beside {PARAMS_FILE}")

    def need(key: str) -> Any:
        if params.get(key) is None:
            raise CheckpointError(f"{file}: missing field {key!r}")
        return params[key]

    first = _load_shard(shards[0])  # lazy: only the pickle's index is read
    try:
        return _config(params, file, path, shards, first, need)
    except CheckpointError:
        raise
    except (TypeError, ValueError, ArithmeticError) as exc:  # int("x"), int(None), int(inf), ModelConfig's checks
        raise CheckpointError(f"{file}: {exc}") from None


def _config(params: dict[str, Any], file: Path, path: Path, shards: list[Path], first: dict[str, Tensor],
            need: Any) -> ModelConfig:  # fmt: skip
    dim, n_heads = int(need("dim")), int(need("n_heads"))
    vocab_size = int(params.get("vocab_size", -1))
    if vocab_size <= 0:  # LLaMA 1/2 params.json say -1: the embedding knows
        emb = first.get("tok_embeddings.weight")
        if emb is None or emb.dim() != 2:
            raise CheckpointError(f"{file}: vocab_size is {vocab_size} and {shards[0].name} has no embedding")
        vocab_size = emb.shape[0] * (len(shards) if emb.shape[1] == dim and len(shards) > 1 else 1)
    scaling = None
    if params.get("use_scaled_rope"):
        scaling = RopeScaling(
            factor=float(params.get("rope_scaling_factor") or 8.0),
            low_freq_factor=float(params.get("rope_low_freq_factor") or 1.0),
            high_freq_factor=float(params.get("rope_high_freq_factor") or 4.0),
            original_max_seq_len=int(params.get("rope_original_max_seq_len") or 8192),
        )
    max_seq_len = params.get("max_seq_len") or (131072 if scaling else 2048)
    tied = bool(params.get("tie_embeddings")) or _shares_embedding(first)
    return ModelConfig(
        dim=dim,
        n_layers=int(need("n_layers")),
        n_heads=n_heads,
        n_kv_heads=_optional(int, params.get("n_kv_heads")),
        vocab_size=vocab_size,
        head_dim=_optional(int, params.get("head_dim")),
        hidden_dim=_optional(int, params.get("hidden_dim")),
        multiple_of=int(params.get("multiple_of", 256)),
        ffn_dim_multiplier=_optional(float, params.get("ffn_dim_multiplier")),
        norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        max_seq_len=int(max_seq_len),
        tie_embeddings=tied,
        name=path.name,
    )


def _optional(kind: type, value: Any) -> Any:
    return None if value is None else kind(value)


def _shares_embedding(state: Mapping[str, Tensor]) -> bool:
    """A file with no output matrix, or one stored as the very same tensor as the embedding, is tied."""
    emb, out = state.get("tok_embeddings.weight"), state.get("output.weight")
    if emb is None:
        return False
    if out is None:
        return True
    return (out.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr() and out.shape == emb.shape
            and out.storage_offset() == emb.storage_offset())  # fmt: skip


def read_tensors(path: str | os.PathLike, config: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    path = Path(path)
    files = shard_files(path)
    if not files:
        raise CheckpointError(f"{path}: no consolidated.NN.pth weight files")
    if len(files) == 1:
        state = _load_shard(files[0])
        skip_output = config.tie_embeddings and _shares_embedding(state)
        for name in list(state):
            tensor = state.pop(name)
            if name in _IGNORED or (name == "output.weight" and skip_output):
                continue
            yield name, tensor
            if sys.getrefcount(tensor) <= 2:  # the loader kept a converted copy, not this memory-mapped tensor
                _release_pages(tensor)
            del tensor
        return
    states = [_load_shard(file) for file in files]
    for name in list(states[0]):
        if name in _IGNORED:
            continue
        parts = []
        for file, state in zip(files, states):
            if name not in state:
                raise CheckpointError(f"{file}: missing tensor {name!r}, which {files[0].name} has")
            parts.append(state.pop(name))
        merged = _merge(name, parts, config)
        for part in parts:
            if part is not merged:
                _release_pages(part)
        del parts
        yield name, merged
        del merged


def _release_pages(tensor: Tensor) -> None:
    """Drop the resident pages of a memory-mapped tensor that is no longer used.

    torch.load(mmap=True) maps the whole file once, so pages read while converting or merging tensors
    would stay resident until the last tensor of the file is freed: a second copy of the model. The
    mapping is private and never written, so the kernel can discard the pages (a later read would only
    fetch them from the file again).
    """
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu":
        return
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _LIBC


_LIBC: ctypes.CDLL | None = None


def _merge(name: str, parts: list[Tensor], config: ModelConfig) -> Tensor:
    if parts[0].dim() < 2:
        return parts[0]  # norms are replicated on every rank
    if name == "tok_embeddings.weight":
        return torch.cat(parts, dim=0 if parts[0].shape[1] == config.dim else 1)
    if name.endswith(_ROW_PARALLEL):
        return torch.cat(parts, dim=1)
    if name.endswith(("attention.wk.weight", "attention.wv.weight")):
        # With more ranks than kv heads, Meta replicates each kv head on consecutive ranks: keep one copy.
        expected = config.kv_heads * config.dim_per_head
        total = sum(p.shape[0] for p in parts)
        repeat = total // expected if expected and total % expected == 0 else 1
        return torch.cat(parts[::repeat], dim=0)
    if name.endswith(_COLUMN_PARALLEL):
        return torch.cat(parts, dim=0)
    return torch.cat(parts, dim=0)


# Writing ----------------------------------------------------------------------------------------
def params_for(config: ModelConfig) -> dict[str, Any]:
    """params.json for `config`, readable by Meta's ``ModelArgs`` (which ignores the extra keys)."""
    if config.n_experts or config.use_qk_norm or config.nope_layer_interval or config.attention_chunk_size:
        raise CheckpointError("writing Llama 4 models in Meta's format is not supported")
    if config.dim_per_head * config.n_heads != config.dim:
        raise CheckpointError(
            f"Meta's format derives head_dim from dim / n_heads; this model's head_dim {config.dim_per_head} "
            f"differs from {config.dim} / {config.n_heads}"
        )
    multiple_of, multiplier = ffn_params(config.dim, config.ffn_hidden_dim, config.multiple_of,
                                         config.ffn_dim_multiplier)  # fmt: skip
    params: dict[str, Any] = {
        "dim": config.dim,
        "n_layers": config.n_layers,
        "n_heads": config.n_heads,
        "n_kv_heads": config.kv_heads,
        "vocab_size": config.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "use_scaled_rope": config.rope_scaling is not None,
        "max_seq_len": config.max_seq_len,
        "hidden_dim": config.ffn_hidden_dim,  # llamaforge's own key; Meta's code recomputes the same value
    }
    s = config.rope_scaling
    if s is not None:
        params["rope_scaling_factor"] = s.factor
        params["rope_high_freq_factor"] = s.high_freq_factor
        params["rope_low_freq_factor"] = s.low_freq_factor
        params["rope_original_max_seq_len"] = s.original_max_seq_len
    if config.tie_embeddings:
        params["tie_embeddings"] = True
    return params


def meta_ffn_width(dim: int, multiple_of: int, multiplier: float | None) -> int:
    """The SwiGLU width Meta's ``FeedForward`` computes."""
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_params(dim: int, hidden: int, multiple_of: int, multiplier: float | None) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's formula gives `hidden`: the model's own when they
    do, else the simplest pair that does."""
    if meta_ffn_width(dim, multiple_of, multiplier) == hidden:
        return multiple_of, multiplier
    for candidate in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if hidden % candidate == 0 and meta_ffn_width(dim, candidate, None) == hidden:
            return candidate, None
    # Any multiplier that lands in (0, hidden] rounds up to `hidden` when multiple_of is `hidden`.
    multiplier = hidden / int(2 * (4 * dim) / 3)
    assert meta_ffn_width(dim, hidden, multiplier) == hidden
    return hidden, multiplier


def write(path: str | os.PathLike, config: ModelConfig, tensors: Mapping[str, Tensor], tokenizer: Any = None,
          dtype: torch.dtype | None = None) -> None:  # fmt: skip
    """Write params.json, consolidated.00.pth and (when the tokenizer has one) tokenizer.model, atomically."""
    from . import atomic_output
    from .hf import _resolve_dtype

    path = Path(path)
    dtype = _resolve_dtype(dtype)
    params = params_for(config)
    check_tensors(path, config, tensors)
    state: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu", dtype if dtype and tensor.dtype.is_floating_point else None)
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size() or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()  # torch.save writes whole storages: never a view's parent
        state[name] = tensor
    if "output.weight" not in state:
        state["output.weight"] = state["tok_embeddings.weight"]  # Meta's model has its own output; stored once
    with atomic_output(path, is_dir=True) as tmp:
        torch.save(state, tmp / "consolidated.00.pth")
        (tmp / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
        _write_tokenizer(tokenizer, tmp)


def _write_tokenizer(tokenizer: Any, directory: Path) -> None:
    """Meta directories carry the tokenizer as tokenizer.model (SentencePiece or tiktoken BPE ranks); a
    tokenizer without one (e.g. a tokenizer.json vocabulary) is left out."""
    if tokenizer is None:
        return
    if hasattr(tokenizer, "save_meta"):
        tokenizer.save_meta(directory)
        return
    files = getattr(tokenizer, "_files_for_save", None)  # llamaforge.tokenizer.Tokenizer: (name, bytes, class)
    if files is None:
        return
    try:
        name, data, _ = files()
    except NotImplementedError:
        return
    if name == TOKENIZER_FILE:
        (directory / TOKENIZER_FILE).write_bytes(data)


__all__ = ["detect", "ffn_params", "meta_ffn_width", "params_for", "read_config", "read_tensors", "write"]
