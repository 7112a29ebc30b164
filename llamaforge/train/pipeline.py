"""Pipeline parallelism with ``torch.distributed.pipelining``: the Transformer's blocks split into stages,
run by a schedule (GPipe, 1F1B or interleaved 1F1B) over the ranks of the mesh's ``pp`` dimension.

A stage is a ``Transformer`` that holds some of the blocks: the first also the embedding, the last also the
final norm and the output projection (``model.py`` runs whatever it holds). Blocks keep their index as their
name (``layers.5`` stays ``layers.5``), so checkpoints carry the same names under every layout and a run can
be resumed on another pipeline depth. Each rank's stages are pruned from the model it built, and a rank that
holds several stages (interleaved schedules) keeps them together in one ``Transformer`` whose parameters the
optimizer and the checkpoints see; the stages share its modules.

Each optimizer step's ``data.grad_accum_steps`` micro-batches become the schedule's micro-batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import Transformer
from .loss import IGNORE_INDEX


class StageLayers(nn.ModuleDict):
    """The blocks a stage holds, named by their index in the whole model; iterates over the blocks."""

    def __iter__(self):
        return iter(self.values())


def stage_layer_ids(n_layers: int, n_stages: int) -> list[list[int]]:
    """Contiguous, equal runs of block indices, one per stage."""
    per = n_layers // n_stages
    return [list(range(s * per, (s + 1) * per)) for s in range(n_stages)]


def rank_stage_ids(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """The stages rank ``pp_rank`` runs: one, or every ``pp``-th for a looped (interleaved) schedule."""
    return [pp_rank + k * pp for k in range(stages_per_rank)]


def split_stages(model: Transformer, stage_ids: Sequence[int], n_stages: int) -> list[Transformer]:
    """Prune ``model`` in place to the union of ``stage_ids`` and return one Transformer per stage.

    With one stage the stage is ``model`` itself; with several, each stage is a Transformer built on the meta
    device whose modules are ``model``'s own (shared, not copied).
    """
    layer_ids = stage_layer_ids(model.config.n_layers, n_stages)
    held = [i for s in stage_ids for i in layer_ids[s]]
    blocks = list(model.layers)
    model.layers = StageLayers({str(i): blocks[i] for i in held})
    if 0 not in stage_ids:
        model.tok_embeddings = None
    if n_stages - 1 not in stage_ids:
        model.norm = None
        model.output = None
    if len(stage_ids) == 1:
        return [model]
    stages = []
    for s in stage_ids:
        with torch.device("meta"):
            stage = Transformer(model.config)
        stage.tok_embeddings = model.tok_embeddings if s == 0 else None
        stage.layers = StageLayers({str(i): model.layers[str(i)] for i in layer_ids[s]})
        stage.norm = model.norm if s == n_stages - 1 else None
        stage.output = model.output if s == n_stages - 1 else None
        stage.rope_freqs = model.rope_freqs
        stages.append(stage)
    return stages


def build_schedule(stages: Sequence[nn.Module], stage_ids: Sequence[int], n_stages: int, name: str,
                   n_microbatches: int, loss_fn: Callable[[Tensor, Tensor], Tensor], device: torch.device,
                   group) -> object:  # fmt: skip
    """The ``torch.distributed.pipelining`` schedule ``name`` over this rank's stages. Gradients are not
    rescaled by the micro-batch count: ``loss_fn`` returns each micro-batch's scaled sum."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    pipeline_stages = [PipelineStage(stage, s, n_stages, device, group=group) for stage, s in zip(stages, stage_ids)]
    if name == "Interleaved1F1B":
        return ScheduleInterleaved1F1B(pipeline_stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    cls = {"GPipe": ScheduleGPipe, "1F1B": Schedule1F1B}[name]
    return cls(pipeline_stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)


class PipelineRunner:
    """Forward and backward of one optimizer step through the pipeline schedule; evaluation through its
    forward-only pass. Loss sums are returned on the last stage and are zero elsewhere."""

    def __init__(self, stages: Sequence[nn.Module], stage_ids: Sequence[int], n_stages: int, schedule: str,
                 n_microbatches: int, device: torch.device, group, loss_parallel: bool = False,
                 autocast: contextlib.AbstractContextManager | None = None) -> None:  # fmt: skip
        self.first = 0 in stage_ids
        self.last = n_stages - 1 in stage_ids
        self.n_microbatches = n_microbatches
        self.device = device
        self.loss_parallel = loss_parallel
        self.autocast = autocast or contextlib.nullcontext()
        self.batches_per_call = n_microbatches
        self.module: nn.Module | None = None  # the CausalLMLoss over this rank's stages (set by parallelize_model)
        self._scale = 1.0
        self.schedule = build_schedule(stages, stage_ids, n_stages, schedule, n_microbatches, self._loss,
                                       device, group)  # fmt: skip

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="sum")  # fmt: skip
        return total * self._scale

    def _run(self, batches: Sequence[dict[str, Tensor]], train: bool) -> Tensor:
        from .tensor_parallel import maybe_loss_parallel

        if len(batches) != self.n_microbatches:
            raise ValueError(f"the pipeline runs {self.n_microbatches} micro-batches per step, got {len(batches)}")
        tokens = torch.cat([b["tokens"] for b in batches])
        targets = torch.cat([b["targets"] for b in batches])
        kwargs = {}
        if batches[0].get("attn_mask") is not None:
            kwargs["attn_mask"] = torch.cat([b["attn_mask"] for b in batches])
        args = (tokens,) if self.first else ()
        target = targets if self.last else None
        losses: list[Tensor] = []
        with maybe_loss_parallel(self.loss_parallel), self.autocast:
            run = self.schedule.step if train else self.schedule.eval
            run(*args, target=target, losses=losses if self.last else None, **kwargs)
        if not losses:
            return torch.zeros((), device=self.device)
        sums = [x.detach().full_tensor() if hasattr(x, "full_tensor") else x.detach() for x in losses]
        return torch.stack(sums).sum().float() / self._scale

    def forward_backward(self, batches: Sequence[dict[str, Tensor]], scale: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Run one step's micro-batches forward and backward (gradients of sum-of-losses x ``scale``); returns the
        loss sum and no other metrics (the next-token loss has none), as ``parallel.LocalRunner`` does."""
        self._scale = scale
        return self._run(batches, train=True), {}

    @torch.no_grad()
    def loss_sum(self, batches: Sequence[dict[str, Tensor]]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The summed loss of ``batches`` (exactly ``n_microbatches`` of them), forward only; the number of
        targets it sums over; no other metrics."""
        self._scale = 1.0
        count = sum((b["targets"] != IGNORE_INDEX).sum() for b in batches)
        return self._run(batches, train=False), torch.as_tensor(count), {}
