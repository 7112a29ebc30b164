"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP): complete or absent, keep-last-N.

A checkpoint is a directory ``step_00000100/`` holding

- the DCP files of ``{"model": ..., "optim": ...}`` (each rank writes its own shards; model and optimizer
  state are taken with ``get_state_dict`` so DDP, FSDP2, tensor- and pipeline-parallel and single-process runs
  use the same names and whole-tensor shapes: a checkpoint saved under one mesh loads under any other);
- ``trainer_state.json``: step, scheduler, data position, recipe and last metrics (rank 0);
- ``rng/rank_<r>.pt``: every rank's random number generator states.

Everything is written into a hidden temporary directory that is renamed into place after every rank has
finished, so a crash leaves either a whole checkpoint or none.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..errors import CheckpointError
from .parallel import barrier, broadcast_object

_STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_and_optim(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(module, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_checkpoint(root: str | Path, step: int, module: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], rank: int = 0, keep_last: int | None = None,
                    tokenizer: Any = None) -> Path:  # fmt: skip
    """Write checkpoint ``step`` under ``root`` (collective: every rank calls it); return its path. Rank 0 adds
    ``tokenizer``'s files (when it can save them), so the checkpoint loads and converts as a model directory."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a crash while saving
        tmp.mkdir()
    barrier()
    with _quiet_single_process():
        dcp.save(_model_and_optim(module, optimizer), checkpoint_id=str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank}.pt")
    barrier()
    if rank == 0:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1, default=_json_default))
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        if final.exists():  # the same step saved again (e.g. a resumed run): replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last:
            for old in checkpoint_dirs(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0,
                    model_names: set[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Restore model, optimizer and this rank's RNG from ``path``; return the trainer state (JSON).

    ``model_names``: the whole model's state-dict names (a pipeline stage holds only some), to refuse a
    checkpoint with tensors the model lacks."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.exists():
        raise CheckpointError(f"{path}: not a training checkpoint (no {STATE_FILE})")
    state = _model_and_optim(module, optimizer)
    check_shapes(path, state["model"], model_names)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / "rng" / f"rank_{rank}.pt"
    if rng_file.exists():  # a different world size has no state for new ranks: they keep their seeds
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads(state_file.read_text())


def saved_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Whole-tensor shapes of the model tensors in DCP checkpoint ``path`` (from its metadata; no data read)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: not a DCP checkpoint (no .metadata)") from exc
    prefix = "model."
    return {key[len(prefix) :]: tuple(item.size) for key, item in metadata.state_dict_metadata.items()
            if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)}  # fmt: skip


def check_shapes(path: str | Path, model_state: dict[str, Any], model_names: set[str] | None = None) -> None:
    """Refuse a checkpoint of another model shape, naming the tensor and both shapes (before DCP reads it)."""
    saved = saved_shapes(path)
    extra = sorted(set(saved) - (model_names if model_names is not None else set(model_state)))
    if extra:
        more = " ..." if len(extra) > 3 else ""
        raise CheckpointError(f"{path}: the checkpoint has tensor(s) this model lacks ({', '.join(extra[:3])}"
                              f"{more}): it was saved from another model shape")  # fmt: skip
    for name, tensor in model_state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        if name not in saved:
            raise CheckpointError(f"{path}: the checkpoint has no tensor {name!r}: it holds another model "
                                  f"({len(saved)} tensors, e.g. {', '.join(sorted(saved)[:3])})")  # fmt: skip
        if tuple(tensor.shape) != saved[name]:  # a DTensor's shape is the whole tensor's
            raise CheckpointError(f"{path}: tensor {name!r} has shape {saved[name]} in the checkpoint but "
                                  f"{tuple(tensor.shape)} in this model (saved from another model shape)")  # fmt: skip


def full_model_state(module: nn.Module, layout: Any = None) -> dict[str, torch.Tensor]:
    """The unsharded model state on CPU: rank 0 gets every tensor, other ranks may get none (collective).

    Under pipeline parallelism (``layout``: a ``mesh.Layout``) each stage's first data- and tensor-parallel rank
    sends its stage's tensors to rank 0.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if layout is None or layout.dims.pp == 1:
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    sender = layout.dp_rank == 0 and layout.tp_rank == 0
    state = {k: v.detach().cpu() for k, v in state.items()} if sender else {}
    parts: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else []
    dist.gather_object(state, parts if dist.get_rank() == 0 else None, dst=0)
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part or {})
    return merged


def find_resume_point(out_dir: str | Path, resume: str | bool) -> Path | None:
    """The checkpoint to resume from: ``True``/"auto" -> the newest under ``out_dir/checkpoints`` (None if
    there is none; "auto" is quiet, ``True`` requires one); a path -> that checkpoint. Decided by rank 0."""
    if resume in (False, None, "", "false", "no"):
        return None
    if resume in (True, "auto", "true", "yes", "latest"):
        found = broadcast_object(latest_checkpoint(Path(out_dir) / "checkpoints"))
        if found is None and resume is True:
            raise CheckpointError(f"--resume: no checkpoint under {Path(out_dir) / 'checkpoints'}")
        return found
    path = Path(str(resume))
    if not (path / STATE_FILE).exists():
        raise CheckpointError(f"--resume {path}: not a complete training checkpoint")
    return path


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns when used without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
