"""Scaling with PyTorch's own engine, applied from outside the model: process groups, DDP, FSDP2
(``torch.distributed.fsdp.fully_shard``), activation checkpointing and ``torch.compile``.

Launch several processes with ``torchrun --nproc_per_node N -m llamaforge pretrain ...``. On CPU the group
uses ``gloo``; when the rendezvous address is the loopback, gloo is bound to the loopback interface too. A
timeout on the group makes a dead rank fail the job instead of hanging it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    started_here: bool = False  # this call created the process group (and will destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, ...), if any.

    A single process without those variables runs undistributed. The group uses NCCL on CUDA and gloo on
    CPU; ``timeout_s`` bounds every collective so that a dead peer ends the job with an error.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(0, 1, 0, dev, False)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, False)
    if dev.type == "cpu" and os.environ.get("MASTER_ADDR", "127.0.0.1") in _LOOPBACK:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # single-host CPU job: keep gloo on the loopback
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                            device_id=dev if dev.type == "cuda" else None)  # fmt: skip
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, True)


def destroy_distributed(info: DistInfo) -> None:
    if info.started_here and dist.is_initialized():
        dist.destroy_process_group()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a llamaforge Transformer (``model.layers``), the unit of sharding and recompute."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no 'layers'; expected a llamaforge Transformer")
    return list(layers)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    The block's ``forward`` is wrapped in place, so parameter names (and checkpoints) stay unchanged.
    """
    for block in transformer_blocks(model):
        if getattr(block, "_lf_checkpointed", False):
            continue
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._lf_checkpointed = True


def apply_compile(model: nn.Module, **options) -> None:
    """``torch.compile`` each block in place (one compiled graph reused by every layer; names unchanged)."""
    for block in transformer_blocks(model):
        block.compile(**options)


def parallelize(module: nn.Module, mode: str, info: DistInfo) -> nn.Module:
    """Wrap the training module for ``mode``: "none", "ddp" or "fsdp" (FSDP2: each block, then the root).

    ``module`` is a ``CausalLMLoss``-like wrapper whose ``.model`` is the Transformer; sharding the root wrapper
    keeps the embedding and output matrices gathered while the loss uses them.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel mode {mode!r}: choose one of {', '.join(PARALLEL_MODES)}")
    if mode == "auto":
        mode = "ddp" if info.distributed else "none"
    if mode == "none":
        if info.distributed:
            raise ValueError("parallel mode 'none' cannot run on several processes; use 'ddp' or 'fsdp'")
        return module
    if not dist.is_initialized():
        raise ValueError(f"parallel mode {mode!r} needs a process group: launch with torchrun")
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    for block in transformer_blocks(module.model):
        fully_shard(block)
    fully_shard(module)
    return module


def parallel_mode(module: nn.Module) -> str:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        return "ddp"
    if type(module).__name__.startswith("FSDP"):  # fully_shard swaps in a subclass named FSDP<Class>
        return "fsdp"
    return "none"


def inner_module(module: nn.Module) -> nn.Module:
    """The wrapped module under DDP (FSDP2 modules are used as they are)."""
    return module.module if parallel_mode(module) == "ddp" else module


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce/reduce-scatter on all but the last micro-batch of an accumulation."""
    mode = parallel_mode(module)
    if mode == "ddp" and not enabled:
        with module.no_sync():
            yield
    elif mode == "fsdp":
        module.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
