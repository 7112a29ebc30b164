"""Checkpoint formats behind one ``load``: Hugging Face directories, Meta directories, GGUF files, and (to read
only) training checkpoints written with ``torch.distributed.checkpoint`` under any device mesh.

Each format module (``hf``, ``meta``, ``gguf``) provides the same four functions:

- ``detect(path) -> bool``: whether ``path`` holds a checkpoint of that format;
- ``read_config(path) -> ModelConfig``;
- ``read_tensors(path, config) -> Iterator[tuple[str, Tensor]]``: tensors under llamaforge's (Meta-style)
  names and layout, produced lazily (memory-mapped where the format allows) so that loading never holds
  two copies of the model;
- ``write(path, config, tensors, tokenizer=None, dtype=None) -> None``: writes a complete checkpoint
  atomically (a temporary sibling, then a rename).

This module dispatches and checks names and shapes once, for every format, with errors that name the
file and the tensor.
"""

from __future__ import annotations

import importlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from ..errors import CheckpointError
from ..model import Transformer

FORMATS = ("hf", "meta", "gguf")  # read and written
READ_ONLY_FORMATS = ("dcp",)  # training checkpoints: read (and converted), written by training only


def format_module(name: str) -> ModuleType:
    if name not in FORMATS + READ_ONLY_FORMATS:
        raise ValueError(f"unknown checkpoint format {name!r}; choose one of {', '.join(FORMATS)}")
    return importlib.import_module(f"{__name__}.{name}")


def detect_format(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    for name in FORMATS + READ_ONLY_FORMATS:
        if format_module(name).detect(path):
            return name
    raise CheckpointError(
        f"{path}: not a checkpoint llamaforge can read (expected a Hugging Face directory with config.json "
        "and *.safetensors, a Meta directory with params.json and consolidated.*.pth, a .gguf file, or a "
        "training checkpoint step_N/ with .metadata and trainer_state.json)"
    )


Transform = Callable[[str, torch.Tensor], torch.Tensor]


def load_model(path: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
               fmt: str | None = None, transform: Transform | None = None) -> tuple[Transformer, str]:  # fmt: skip
    """Read a checkpoint into a Transformer, materializing each tensor once, directly on `device`.

    Returns the model and the format name. ``dtype=None`` keeps the dtype the checkpoint stores
    (float32 for quantized GGUF tensors, which are dequantized). ``transform(name, tensor)`` replaces each tensor
    as it is read, e.g. by a tensor-parallel rank's slice of it (the expected shapes are transformed alike).
    """
    path = Path(path)
    fmt = fmt or detect_format(path)
    module = format_module(fmt)
    config = module.read_config(path)
    tensors = module.read_tensors(path, config)
    first = next(tensors, None)  # the files' own checks (headers, offsets) report damage first
    _check_size(path, config)
    with torch.device("meta"):
        model = Transformer(config)
    expected = dict(model.state_dict())
    if transform is not None:
        expected = {name: transform(name, tensor) for name, tensor in expected.items()}
    optional = {"output.weight"} if config.tie_embeddings else set()
    seen: set[str] = set()
    for name, tensor in itertools.chain([first] if first is not None else [], tensors):
        if transform is not None and name in expected:
            tensor = transform(name, tensor)
        if name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} for a {config.n_layers}-layer model")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
        tensor = tensor.to(device=device or "cpu", dtype=dtype or _float_dtype(tensor))
        _assign(model, name, tensor)
        seen.add(name)
    missing = sorted(set(expected) - seen - optional)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing tensors {', '.join(missing[:5])}{more}")
    if config.tie_embeddings and "output.weight" in seen:
        # A tied model's file carrying its own output matrix: keep the file's matrix, untied.
        model.config = config = config.replace(tie_embeddings=False)
    else:
        model.tie_weights()
    model.reset_buffers()
    return model, fmt


MIN_BITS_PER_WEIGHT = 2  # below every format llamaforge reads (GGUF Q2_K stores 2.625 bits per weight)


def dense_parameters(config) -> int:
    """The parameter count of a dense model of `config` (no module is built)."""
    d, q, kv = config.dim, config.n_heads * config.dim_per_head, config.kv_heads * config.dim_per_head
    layer = 2 * d * q + 2 * d * kv + 3 * d * config.ffn_hidden_dim + 2 * d
    return config.n_layers * layer + config.vocab_size * d * (1 if config.tie_embeddings else 2) + d


def _check_size(path: Path, config) -> None:
    """Refuse a configuration that needs more weights than the checkpoint's files can hold, before building the
    model from it: a damaged config (a billion layers) must not make llamaforge build a model that size."""
    if config.n_experts:
        return
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    n = dense_parameters(config)
    if n * MIN_BITS_PER_WEIGHT // 8 > size:
        raise CheckpointError(
            f"{path}: the configuration describes a model of {n:,} parameters ({config.n_layers} layers of width "
            f"{config.dim}, vocabulary {config.vocab_size}), but the checkpoint holds only {size:,} bytes: the "
            "configuration is wrong or weights are missing"
        )


# A float32/16 forward takes float16 or bfloat16 parameters beside its own (norm weights promote), but not float64
# ones (a matmul of float and double fails), nor float8 (no arithmetic), nor integers.
_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _float_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a tensor loads in: its own where a forward can compute with it, else float32 (float64, float8,
    integers)."""
    return tensor.dtype if tensor.dtype in _COMPUTE_DTYPES else torch.float32


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    setattr(owner, attr, nn.Parameter(tensor, requires_grad=False))


def model_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors under llamaforge names, without the duplicate output matrix of a tied model."""
    tensors = dict(model.state_dict())
    if model.config.tie_embeddings:
        tensors.pop("output.weight", None)
    return tensors


def check_tensors(path: str | os.PathLike, config, tensors) -> dict[str, tuple[int, ...]]:
    """Refuse to write a checkpoint whose tensors do not match `config` (names and shapes); return the
    expected shapes in the model's own order. Every format's ``write`` calls this first."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Transformer(config).state_dict().items()}
    if config.tie_embeddings:
        expected.pop("output.weight")
    unknown = sorted(set(tensors) - set(expected) - {"output.weight"})
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        raise CheckpointError(f"cannot write {path}: unexpected tensors {unknown[:5]}, missing tensors {missing[:5]}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(
                f"cannot write {path}: {name} has shape {tuple(tensors[name].shape)}, expected {shape}"
            )
    return expected


def save_model(model: Transformer, path: str | os.PathLike, fmt: str, tokenizer=None,
               dtype: torch.dtype | str | None = None) -> Path:  # fmt: skip
    """Write `model` (and its tokenizer, when given) as a checkpoint of format `fmt` at `path`.

    ``dtype``: a float dtype for the weights; for GGUF also a llama.cpp quantization mix such as ``"q4_k_m"``.
    """
    path = Path(path)
    if model.config.cross_attention_layers:  # the text model alone would be a different, broken model
        raise CheckpointError(f"{path}: writing Llama 3.2 Vision (cross-attention layers) as {fmt} is not supported")
    format_module(fmt).write(path, model.config, model_tensors(model), tokenizer=tokenizer, dtype=dtype)
    return path


@contextmanager
def atomic_output(path: str | os.PathLike, is_dir: bool) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write into; rename it onto `path` only on success.

    A crash or error leaves `path` as it was (absent or the previous complete version), never partial.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir and path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


__all__ = ["FORMATS", "READ_ONLY_FORMATS", "atomic_output", "check_tensors", "detect_format", "format_module",
           "load_model", "model_tensors", "save_model"]  # fmt: skip
