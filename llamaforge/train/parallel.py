"""Scaling with PyTorch's own engine, applied from outside the model: process groups, DDP, FSDP2
(``torch.distributed.fsdp.fully_shard``), tensor and pipeline parallelism on a device mesh (``mesh.py``,
``tensor_parallel.py``, ``pipeline.py``), activation checkpointing and ``torch.compile``.

Launch several processes with ``torchrun --nproc_per_node N -m llamaforge pretrain ...``; the process group
itself is ``llamaforge/distributed.py``'s (shared with tensor-parallel inference).

``parallelize_model`` applies a layout in torchtitan's order: pipeline split, tensor parallel, activation
checkpointing, ``torch.compile`` per block, then FSDP2 over the data-parallel ranks (or DDP).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..distributed import DistInfo
from ..errors import UserError
from .mesh import Layout

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")


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


def apply_compile(model: nn.Module, parts: bool = False, **options) -> None:
    """``torch.compile`` each block in place (one compiled graph reused by every layer; names unchanged).

    ``parts=True`` compiles each block's attention and feed-forward instead (the tensor-parallel case): torch 2.13
    fails in the backward of a whole compiled tensor-parallel block (a DTensor redistribution receives a plain
    gradient where the residual adds meet the sequence-parallel norms). The parts take and give plain tensors
    (see ``tensor_parallel.py``); compiled with DTensor inputs, their gradients came out wrong (measured on CPU).
    """
    for block in transformer_blocks(model):
        if parts:
            for name in ("attention", "feed_forward"):
                block.get_submodule(name).compile(**options)
        else:
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


def local_value(x: Tensor) -> Tensor:
    """A DTensor's whole value (collective over its mesh); a plain tensor as it is."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def add_sums(sums: dict[str, Tensor], more: dict[str, Tensor]) -> None:
    """Add a loss module's metric sums (``{name: tensor}``) into ``sums``, detached, in float64."""
    for key, value in more.items():
        value = local_value(value.detach()).double()
        sums[key] = sums[key] + value if key in sums else value


class LocalRunner:
    """Forward and backward of a step's micro-batches on this rank's whole model (replicated, FSDP-sharded or
    tensor-parallel). ``module`` is the loss module, possibly wrapped: ``module(**batch)`` returns
    ``(loss_sum, n_units[, {metric: sum}])`` (``CausalLMLoss``, or another objective's, e.g. ``dpo.PreferenceLoss``).
    """

    batches_per_call = 1

    def __init__(self, module: nn.Module, loss_parallel: bool = False,
                 autocast: contextlib.AbstractContextManager | None = None) -> None:  # fmt: skip
        self.module = module
        self.loss_parallel = loss_parallel
        self.autocast = autocast or contextlib.nullcontext()

    def forward_backward(self, batches: Sequence[dict[str, Tensor]], scale: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Gradients of (sum of the batches' losses) x ``scale``; the gradient all-reduce or reduce-scatter runs
        with the last micro-batch only. Returns the loss sum and the sums of the loss module's other metrics."""
        from .tensor_parallel import maybe_loss_parallel

        total, sums = None, {}
        for i, batch in enumerate(batches):
            with gradient_sync(self.module, i == len(batches) - 1), maybe_loss_parallel(self.loss_parallel):
                with self.autocast:
                    part, _, *more = self.module(**batch)
                (part * scale).backward()
            value = local_value(part.detach()).float()
            total = value if total is None else total + value
            add_sums(sums, more[0] if more else {})
        return total, sums

    @torch.no_grad()
    def loss_sum(self, batches: Sequence[dict[str, Tensor]]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The summed loss of ``batches``, the units it sums over and the other metrics' sums, forward only."""
        from .tensor_parallel import maybe_loss_parallel

        total, units, sums = None, None, {}
        for batch in batches:
            with maybe_loss_parallel(self.loss_parallel), self.autocast:
                part, count, *more = self.module(**batch)
            value, count = local_value(part).float(), local_value(count).double()
            total = value if total is None else total + value
            units = count if units is None else units + count
            add_sums(sums, more[0] if more else {})
        return total, units, sums


def parallelize_model(model: nn.Module, layout: Layout, device: torch.device, loss_module: nn.Module | None = None,
                      *, activation_checkpointing: bool = False, compile: bool = False,
                      autocast: contextlib.AbstractContextManager | None = None, microbatches: int = 1):  # fmt: skip
    """Apply ``layout`` to the Transformer ``model`` for training and return the runner of its steps
    (``LocalRunner`` or ``pipeline.PipelineRunner``); ``runner.module`` is the loss module whose parameters the
    optimizer updates and whose state dict the checkpoints hold (names as in the whole model).

    ``loss_module`` wraps ``model`` as its ``.model`` (default: ``CausalLMLoss(model, fused=False)``). Tensor
    parallelism and pipelines need the next-token loss from logits (``CausalLMLoss`` with ``fused=False``): a
    pipeline's last stage computes it itself, and under tensor parallelism the logits are split over the
    vocabulary. A pipeline runs ``microbatches`` micro-batches per step.
    """
    from .loss import CausalLMLoss
    from .pipeline import PipelineRunner, rank_stage_ids, split_stages
    from .tensor_parallel import apply_tensor_parallel

    dims = layout.dims
    module: nn.Module = CausalLMLoss(model, fused=False) if loss_module is None else loss_module
    if getattr(module, "model", None) is not model:
        raise ValueError(f"the loss module {type(module).__name__} does not wrap the model as its .model")
    split = dims.tp > 1 or dims.pp > 1
    if split and not isinstance(module, CausalLMLoss):
        what = " and ".join(f"parallel.{k} {v}" for k, v in (("tp", dims.tp), ("pp", dims.pp)) if v > 1)
        raise UserError(f"{what}: the {type(module).__name__} objective runs under data parallelism only "
                        "(train.parallel ddp or fsdp, parallel.dp_shard); set parallel.tp and parallel.pp to 1 "
                        "(tensor and pipeline parallelism compute the next-token loss only)")  # fmt: skip
    if split and module.fused:
        raise ValueError("tensor and pipeline parallelism need CausalLMLoss(fused=False): the fused loss reads the "
                         "whole output matrix")  # fmt: skip
    if dims.pp > 1:
        stage_ids = rank_stage_ids(layout.pp_rank, dims.pp, dims.stages_per_rank)
        stages = split_stages(model, stage_ids, dims.n_stages)
    else:
        stage_ids, stages = [0], [model]
    if dims.tp > 1:
        for s, stage in zip(stage_ids, stages):
            apply_tensor_parallel(stage, layout.tp_mesh, transformer_blocks(stage), whole_input=s > 0,
                                  whole_output=s < dims.n_stages - 1)  # fmt: skip
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model, parts=dims.tp > 1)
    if dims.dp_mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        dp_mesh = layout.dp_mesh
        for block in transformer_blocks(model):
            fully_shard(block, mesh=dp_mesh)
        # The root holds the embedding and output matrices gathered while the loss reads them; in a pipeline
        # each stage is its own root (the schedule drives its gradient reduction).
        for root in stages if dims.pp > 1 else [module]:
            fully_shard(root, mesh=dp_mesh)
    elif dims.dp_mode == "ddp":
        if not dist.is_initialized():
            raise ValueError("parallel mode 'ddp' needs a process group: launch with torchrun")
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        module = DistributedDataParallel(module, device_ids=device_ids)
    if dims.pp > 1:
        runner = PipelineRunner(stages, stage_ids, dims.n_stages, dims.pp_schedule, microbatches, device,
                                layout.pp_group, loss_parallel=dims.tp > 1, autocast=autocast)  # fmt: skip
        runner.module = module
        return runner
    return LocalRunner(module, loss_parallel=dims.tp > 1, autocast=autocast)


def clip_grad_norm(params: list[Tensor], max_norm: float, pp_group: dist.ProcessGroup | None = None) -> float:
    """Clip the global gradient norm (over every shard: FSDP and tensor-parallel DTensors, and the stages of a
    pipeline); return the norm before clipping. ``max_norm <= 0`` only measures."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())
    norm = local_value(norm).float()
    if pp_group is not None:  # each stage holds some of the parameters: combine the squares
        squared = norm.pow(2)
        dist.all_reduce(squared, group=pp_group)
        norm = squared.sqrt()
    if max_norm > 0 and grads:
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm, foreach=True)
    return float(norm)
