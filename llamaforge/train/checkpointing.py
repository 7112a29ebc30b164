"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP): complete or absent, keep-last-N.

A checkpoint is a directory ``step_00000100/`` holding

- the DCP files of ``{"model": ..., "optim": ...}`` (each rank writes its own shards; model and optimizer
  state are taken with ``get_state_dict`` so DDP, FSDP2 and single-process runs use the same names);
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
                    trainer_state: dict[str, Any], rank: int = 0, keep_last: int | None = None) -> Path:  # fmt: skip
    """Write checkpoint ``step`` under ``root`` (collective: every rank calls it); return its path."""
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
        if final.exists():  # the same step saved again (e.g. a resumed run): replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last:
            for old in checkpoint_dirs(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                    rank: int = 0) -> dict[str, Any]:  # fmt: skip
    """Restore model, optimizer and this rank's RNG from ``path``; return the trainer state (JSON)."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.exists():
        raise CheckpointError(f"{path}: not a training checkpoint (no {STATE_FILE})")
    state = _model_and_optim(module, optimizer)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / "rng" / f"rank_{rank}.pt"
    if rng_file.exists():  # a different world size has no state for new ranks: they keep their seeds
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads(state_file.read_text())


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state on CPU (rank 0 gets tensors; collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)


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
