"""The N-D device mesh of a training run: data parallel (FSDP2) x tensor parallel x pipeline parallel.

A recipe's ``parallel`` section asks for ``dp_shard`` x ``tp`` x ``pp`` processes. ``check_layout`` tests that
request against the world size and the model's shape before any weight exists, so a layout that cannot work
fails at once with the numbers at fault. ``build_layout`` then makes the ``DeviceMesh`` (pipeline outermost,
tensor parallel innermost, so that a tensor-parallel group shares a host where it can) and tells each rank its
coordinates: which data shard it reads, whether it reports the loss, which pipeline stages it holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..errors import UserError

DP_MODES = ("auto", "none", "ddp", "fsdp")
PP_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B")


@dataclass(frozen=True)
class ParallelDims:
    """How the world is divided: ``dp`` data-parallel replicas or shards (``dp_mode`` "ddp", "fsdp" or "none")
    x ``tp`` tensor-parallel ranks x ``pp`` pipeline ranks, each holding ``stages_per_rank`` stages."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    dp_mode: str = "none"
    pp_schedule: str = "1F1B"
    stages_per_rank: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def n_stages(self) -> int:
        return self.pp * self.stages_per_rank

    @property
    def uses_mesh(self) -> bool:
        """Whether the run needs a DeviceMesh (FSDP2, tensor or pipeline parallel); DDP and one process do not."""
        return self.dp_mode == "fsdp" or self.tp > 1 or self.pp > 1

    def data_rank(self, rank: int) -> int:
        """The data-parallel rank of global rank ``rank`` in ``build_layout``'s mesh (pp, dp, tp): which share of
        the batch it reads (its tensor- and pipeline-parallel peers read the same one)."""
        return rank // self.tp % self.dp

    def describe(self) -> str:
        parts = [f"{self.dp_mode} {self.dp}" if self.dp_mode != "none" else "", f"tp {self.tp}" if self.tp > 1 else "",
                 f"pp {self.pp} ({self.pp_schedule}, {self.n_stages} stages)" if self.pp > 1 else ""]  # fmt: skip
        return " x ".join(p for p in parts if p) or "one process"


def resolve_dims(world_size: int, dp_mode: str = "auto", dp_shard: int = -1, tp: int = 1, pp: int = 1,
                 pp_schedule: str = "1F1B", stages_per_rank: int | None = None) -> ParallelDims:  # fmt: skip
    """Turn a recipe's request into concrete sizes for ``world_size`` processes, or raise a UserError naming the
    numbers that do not fit. ``dp_shard=-1`` takes whatever ``tp`` x ``pp`` leaves of the world."""
    where = "parallel"
    if dp_mode not in DP_MODES:
        raise UserError(f"train.parallel {dp_mode!r}: choose one of {', '.join(DP_MODES)}")
    if pp_schedule not in PP_SCHEDULES:
        raise UserError(f"{where}.pp_schedule {pp_schedule!r}: choose one of {', '.join(PP_SCHEDULES)}")
    for name, value in (("tp", tp), ("pp", pp)):
        if value < 1:
            raise UserError(f"{where}.{name} must be at least 1, got {value}")
    if dp_shard == 0 or dp_shard < -1:
        raise UserError(f"{where}.dp_shard must be positive or -1 (the rest of the world), got {dp_shard}")
    if world_size % (tp * pp):
        raise UserError(f"{where}: tp {tp} x pp {pp} = {tp * pp} does not divide the world size {world_size} "
                        f"(torchrun --nproc-per-node x --nnodes)")  # fmt: skip
    dp = world_size // (tp * pp) if dp_shard == -1 else dp_shard
    if dp * tp * pp != world_size:
        raise UserError(f"{where}: dp_shard {dp} x tp {tp} x pp {pp} = {dp * tp * pp} processes, but the world "
                        f"size is {world_size}; set dp_shard to -1 or to {world_size // (tp * pp)}")  # fmt: skip
    if dp_mode == "auto":
        dp_mode = "fsdp" if (tp > 1 or pp > 1 or dp_shard != -1) and dp > 1 else ("ddp" if dp > 1 else "none")
    if dp_mode == "none" and dp > 1:
        raise UserError(f"train.parallel 'none' cannot run {dp} data-parallel processes; use 'ddp' or 'fsdp'")
    if dp_mode == "ddp" and (tp > 1 or pp > 1):
        raise UserError("train.parallel 'ddp' does not compose with tensor or pipeline parallelism; use 'fsdp' "
                        "(FSDP2 shards over the data-parallel ranks of the mesh)")  # fmt: skip
    if dp == 1 and dp_mode == "ddp":
        dp_mode = "none"
    if stages_per_rank is None:
        stages_per_rank = 2 if pp_schedule == "Interleaved1F1B" else 1
    if stages_per_rank < 1:
        raise UserError(f"{where}.pp_stages_per_rank must be at least 1, got {stages_per_rank}")
    if pp_schedule != "Interleaved1F1B" and stages_per_rank != 1 and pp > 1:
        raise UserError(f"{where}: pp_schedule {pp_schedule} runs one stage per rank; use Interleaved1F1B for "
                        f"{stages_per_rank} stages per rank")  # fmt: skip
    return ParallelDims(dp, tp, pp, dp_mode, pp_schedule, stages_per_rank if pp > 1 else 1)


def check_model(dims: ParallelDims, config: ModelConfig, seq_len: int, microbatches: int) -> None:
    """Refuse a layout that the model's shape cannot take, naming the numbers (called before any weight exists).

    ``microbatches`` is the pipeline's micro-batch count per step (the recipe's ``data.grad_accum_steps``).
    """
    problems = []
    tp = dims.tp
    if tp > 1:
        sizes = {"n_heads": config.n_heads, "n_kv_heads": config.kv_heads, "the FFN width (hidden_dim)":
                 config.ffn_hidden_dim, "vocab_size": config.vocab_size, "data.seq_len": seq_len}  # fmt: skip
        for name, value in sizes.items():
            if value % tp:
                problems.append(f"{name} ({value}) is not divisible by parallel.tp ({tp})")
        if config.n_experts:
            problems.append("tensor parallelism of mixture-of-experts layers (expert parallelism) is not supported")
    if dims.pp > 1:
        if config.n_layers % dims.n_stages:
            problems.append(f"n_layers ({config.n_layers}) is not divisible by the {dims.n_stages} pipeline stages "
                            f"(parallel.pp {dims.pp} x {dims.stages_per_rank} stage(s) per rank)")  # fmt: skip
        if config.tie_embeddings:
            problems.append("tied input/output embeddings cannot be split over pipeline stages (the first and the "
                            "last stage would share one matrix)")  # fmt: skip
        if microbatches < dims.pp and dims.pp_schedule != "GPipe":
            problems.append(f"the {dims.pp_schedule} schedule needs at least parallel.pp ({dims.pp}) micro-batches "
                            f"per step; data.grad_accum_steps is {microbatches}")  # fmt: skip
        if dims.pp_schedule == "Interleaved1F1B" and microbatches % dims.pp:
            problems.append(f"Interleaved1F1B needs a multiple of parallel.pp ({dims.pp}) micro-batches per step; "
                            f"data.grad_accum_steps is {microbatches}")  # fmt: skip
    if problems:
        raise UserError(f"parallel layout {dims.describe()} does not fit the model "
                        f"({config.name or 'custom'}): " + "; ".join(problems))  # fmt: skip


@dataclass
class Layout:
    """This rank's place in the mesh. ``mesh`` is None for DDP and single-process runs."""

    dims: ParallelDims
    mesh: object | None = None  # torch.distributed.device_mesh.DeviceMesh
    dp_rank: int = 0
    tp_rank: int = 0
    pp_rank: int = 0

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def owns_data(self) -> bool:
        """Counts this rank's tokens (every tensor- and pipeline-parallel peer reads the same batch)."""
        return self.tp_rank == 0 and self.pp_rank == 0

    @property
    def owns_loss(self) -> bool:
        """Reports this rank's loss (the last pipeline stage has it; tensor-parallel peers hold copies)."""
        return self.tp_rank == 0 and self.pp_rank == self.dims.pp - 1

    def submesh(self, name: str):
        """The 1-D mesh of dimension ``name`` ("dp", "tp" or "pp") through this rank."""
        return None if self.mesh is None else self.mesh[name]

    @property
    def dp_mesh(self):
        return self.submesh("dp")

    @property
    def tp_mesh(self):
        return self.submesh("tp") if self.dims.tp > 1 else None

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        return self.submesh("pp").get_group() if self.dims.pp > 1 else None


def build_layout(dims: ParallelDims, device: torch.device, rank: int = 0) -> Layout:
    """The DeviceMesh (pp, dp, tp) of ``dims`` and this rank's coordinates in it (collective)."""
    if not dims.uses_mesh:
        return Layout(dims, None, dp_rank=rank)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dims.pp, dims.dp, dims.tp), mesh_dim_names=("pp", "dp", "tp"))
    if dims.dp > 1 and dims.tp > 1:  # one collective instead of two for reductions over both (the gradient norm)
        mesh["dp", "tp"]._flatten("dp_tp")
    return Layout(dims, mesh, dp_rank=mesh["dp"].get_local_rank(), tp_rank=mesh["tp"].get_local_rank(),
                  pp_rank=mesh["pp"].get_local_rank())  # fmt: skip
