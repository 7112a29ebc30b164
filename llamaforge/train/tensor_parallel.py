"""Tensor parallelism (Megatron-style) applied to a llamaforge Transformer from outside, with
``torch.distributed.tensor.parallel.parallelize_module``.

In each block the projections that open a computation are split by output features (``ColwiseParallel``: wq,
wk, wv by heads, w1 and w3 by FFN width) and those that close it by input features (``RowwiseParallel``: wo,
w2), so a block needs one reduction in the attention and one in the FFN. Between them the activations are
split along the sequence (``SequenceParallel`` on the RMSNorms): the reductions become reduce-scatters and the
norms, residual adds and their activations cost 1/tp per rank. The embedding is split by vocabulary rows, the
output projection by vocabulary columns, and its logits stay split for ``loss_parallel`` (the cross-entropy
over a vocabulary no rank holds whole). Both split the [vocab, dim] matrix by rows, so a tied model keeps one
matrix for the two: ``parallelize_module`` distributes each module's parameter on its own, which would leave two
copies that each receive only their own part of the gradient, so the tie is restored afterwards.

The attention and the FFN take their gathered input as a plain tensor (``use_local_output``), so that
``torch.compile`` of either sees no DTensor at its boundary: with a DTensor input the compiled backward gave wrong
gradients (torch 2.13, CPU), with a plain one the same as eager.

A pipeline stage sends and receives whole activations [B, T, dim]: its first block takes them in and its last
block gives them back whole, so the stage code never sees a sequence shard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import Placement

from ..errors import UserError
from .lora import LoRALinear

# The block's (and the attention's) forward arguments after x: cos, sin, positions, mask, cache (left as they are).
_BLOCK_EXTRA_ARGS = (None,) * 5


def _require(module: nn.Module, name: str, kind: type) -> None:
    sub = module.get_submodule(name)
    if type(sub) is kind:
        return
    if kind is nn.Linear and isinstance(sub, LoRALinear):
        if type(sub.base) is nn.Linear:
            return
        raise UserError(f"tensor parallelism does not split quantized layers: {name} adapts a "
                        f"{type(sub.base).__name__} (QLoRA); use LoRA on a float base (finetune --method lora) or "
                        "data parallelism (parallel.tp 1)")  # fmt: skip
    raise UserError(f"tensor parallelism needs plain {kind.__name__} layers; {name} is a {type(sub).__name__} "
                    "(quantized layers are not split; use data or pipeline parallelism)")  # fmt: skip


def _linear_style(module: nn.Module, name: str, rowwise: bool, **layouts) -> ParallelStyle:
    """The parallel style of linear layer ``name``: ``ColwiseParallel`` / ``RowwiseParallel``, or for a LoRA
    layer (``lora.LoRALinear``) ``LoRAParallel`` with the same layouts."""
    if isinstance(module.get_submodule(name), LoRALinear):
        return LoRAParallel(rowwise=rowwise, **layouts)
    return (RowwiseParallel if rowwise else ColwiseParallel)(**layouts)


class LoRAParallel(ParallelStyle):
    """A LoRA layer ``base(x) + scale * B(A(x))`` (``lora.LoRALinear``) split as its base: column-wise
    (``rowwise=False``) the base and B by output features with A whole; row-wise the base and A by input features
    with B whole, and the ranks' partial outputs of base and adapter reduced together. Inside, the layer computes on
    DTensors, so the gradient of the whole matrix (A column-wise, B row-wise), of which each rank computes a part, is
    summed over the ranks. The layouts are ``ColwiseParallel``'s and ``RowwiseParallel``'s."""

    def __init__(self, *, rowwise: bool, input_layouts: Placement | None = None,
                 output_layouts: Placement | None = None, use_local_output: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.rowwise = rowwise
        self.input_layout = input_layouts or (Shard(-1) if rowwise else Replicate())
        self.output_layout = output_layouts or (Replicate() if rowwise else Shard(-1))
        self.use_local_output = use_local_output

    def _partition(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if name == "":  # the LoRA layer: A [r, in], B [out, r]
            plan = {"lora_A": Shard(1) if self.rowwise else Replicate(),
                    "lora_B": Replicate() if self.rowwise else Shard(0)}  # fmt: skip
        elif name == "base":
            plan = {"weight": Shard(1) if self.rowwise else Shard(0)}
        else:
            return
        for key, placement in plan.items():
            p = getattr(module, key)
            # requires_grad kept: the frozen base stays frozen (a new nn.Parameter would train it)
            module.register_parameter(key, nn.Parameter(distribute_tensor(p, mesh, [placement]),
                                                        requires_grad=p.requires_grad))  # fmt: skip

    def _input(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, (self.input_layout,), run_check=False)
        wanted = Shard(-1) if self.rowwise else Replicate()
        return (x.redistribute(placements=(wanted,)) if x.placements != (wanted,) else x, *inputs[1:])

    def _output(self, module: nn.Module, out: DTensor, mesh: DeviceMesh):
        if out.placements != (self.output_layout,):  # row-wise: Partial, reduced (scattered) here
            out = out.redistribute(placements=(self.output_layout,))
        return out.to_local() if self.use_local_output else out

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition, self._input, self._output)


def apply_tensor_parallel(model: nn.Module, tp_mesh, blocks: Sequence[nn.Module], *, whole_input: bool = False,
                          whole_output: bool = False) -> None:  # fmt: skip
    """Split ``model``'s parameters over ``tp_mesh`` in place (``blocks``: the blocks this rank holds, in order).

    ``model.tok_embeddings``, ``model.norm`` and ``model.output`` are split when present (a pipeline stage may
    lack them). ``whole_input`` / ``whole_output``: the first block takes / the last block gives whole activations
    (pipeline stage boundaries) instead of sequence shards.
    """
    root_plan = {}
    embedding, output = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    tied = embedding is not None and output is not None and getattr(output, "weight", None) is embedding.weight
    # parallelize_module makes every split parameter trainable: the ones frozen (LoRA's base) are frozen again
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    if embedding is not None:
        _require(model, "tok_embeddings", nn.Embedding)
        root_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if getattr(model, "norm", None) is not None:
        root_plan["norm"] = SequenceParallel()
    if output is not None:
        _require(model, "output", nn.Linear)
        root_plan["output"] = _linear_style(model, "output", rowwise=False, input_layouts=Shard(1),
                                            output_layouts=Shard(-1), use_local_output=False)  # fmt: skip
    if root_plan:
        parallelize_module(model, tp_mesh, root_plan)
    if tied:  # parallelize_module gave each module its own copy (both Shard(0)): share the embedding's again
        output.weight = embedding.weight
    for i, block in enumerate(blocks):
        if not hasattr(block.feed_forward, "w1"):
            raise UserError("tensor parallelism of mixture-of-experts layers (expert parallelism) is not supported")
        for name in ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                     "feed_forward.w2", "feed_forward.w3"):  # fmt: skip
            _require(block, name, nn.Linear)
        plan = {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), *_BLOCK_EXTRA_ARGS), use_local_output=True,
                                            desired_input_layouts=(Replicate(), *_BLOCK_EXTRA_ARGS)),
            "attention.wq": _linear_style(block, "attention.wq", rowwise=False),
            "attention.wk": _linear_style(block, "attention.wk", rowwise=False),
            "attention.wv": _linear_style(block, "attention.wv", rowwise=False),
            "attention.wo": _linear_style(block, "attention.wo", rowwise=True, output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                               use_local_output=True),
            "feed_forward.w1": _linear_style(block, "feed_forward.w1", rowwise=False),
            "feed_forward.w2": _linear_style(block, "feed_forward.w2", rowwise=True, output_layouts=Shard(1)),
            "feed_forward.w3": _linear_style(block, "feed_forward.w3", rowwise=False),
        }  # fmt: skip
        parallelize_module(block, tp_mesh, plan)
        if whole_input and i == 0:  # whole activations in, this rank's sequence shard on into the block
            whole = PrepareModuleInput(input_layouts=(Replicate(), *_BLOCK_EXTRA_ARGS), use_local_output=True,
                                       desired_input_layouts=(Shard(1), *_BLOCK_EXTRA_ARGS))  # fmt: skip
            parallelize_module(block, tp_mesh, whole)
        if whole_output and i == len(blocks) - 1:  # the sequence shards gathered for the next stage
            gather = PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate())
            parallelize_module(block, tp_mesh, gather)
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)


@contextlib.contextmanager
def maybe_loss_parallel(enabled: bool) -> Iterator[None]:
    """``torch.distributed.tensor.parallel.loss_parallel`` when the logits are split over the vocabulary: the
    cross-entropy and its backward run on the shards (both must run inside)."""
    if not enabled:
        yield
        return
    from torch.distributed.tensor.parallel import loss_parallel

    with loss_parallel():
        yield
