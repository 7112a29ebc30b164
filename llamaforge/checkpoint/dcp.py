"""Training checkpoints (``torch.distributed.checkpoint`` directories written by ``llamaforge pretrain`` and
``finetune``) as a source for ``load`` and ``convert``: read-only.

DCP stores every tensor whole in its metadata, however the run that wrote it was laid out (FSDP2 shards,
tensor-parallel slices, pipeline stages), so one process reads the model back unsharded: a checkpoint from
any mesh converts to Hugging Face, Meta or GGUF. The model's shape comes from ``trainer_state.json``
(``model_config``, or the recipe of checkpoints written before it was recorded); tokenizer files saved with
the checkpoint are found by ``load`` as in any model directory.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import CheckpointError

STATE_FILE = "trainer_state.json"
PREFIX = "model.model."  # DCP key of a model tensor: the "model" entry, then the training wrapper's ".model"


def detect(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / STATE_FILE).is_file()


def read_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / STATE_FILE}: cannot read the trainer state: {exc}") from exc
    if "model_config" in state:
        return ModelConfig.from_dict(state["model_config"])
    from ..train.recipe import Recipe

    recipe = Recipe.from_dict(state.get("recipe") or {}, str(path / STATE_FILE))
    if recipe.model.from_checkpoint and recipe.model.preset is None and recipe.model.config is None:
        raise CheckpointError(f"{path / STATE_FILE}: records no model_config, and its recipe starts from "
                              f"{recipe.model.from_checkpoint}; cannot tell the model's shape")  # fmt: skip
    return recipe.model_config()


def read_tensors(path: str | os.PathLike, config: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """The model's tensors, whole, on the CPU (one process, no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    state: dict[str, Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        name = key[len(PREFIX) :]
        if config.tie_embeddings and name == "output.weight":
            continue  # the tied embedding, saved under both names
        if key.startswith(PREFIX) and isinstance(item, TensorStorageMetadata):
            state[name] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
    if not state:
        raise CheckpointError(f"{path}: a DCP checkpoint without model tensors (expected keys {PREFIX}*)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": {f"model.{k}": v for k, v in state.items()}}, checkpoint_id=str(path), no_dist=True)
    yield from state.items()


def write(path: str | os.PathLike, config: ModelConfig, tensors, tokenizer=None, dtype=None) -> None:
    raise CheckpointError(f"{path}: training checkpoints are written by training; convert to hf, meta or gguf")
