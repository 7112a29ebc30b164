"""Training recipes (YAML + command-line overrides) and the training loop.

A recipe has six sections — ``model``, ``data``, ``optim``, ``train``, ``logging``, ``parallel`` — whose defaults
are the LLaMA paper's choices where it makes one (AdamW β2 0.95, weight decay 0.1, warm-up 2000 steps, cosine
to 10%, clipping 1.0). ``parallel`` lays the processes out as a mesh (``dp_shard`` x ``tp`` x ``pp``). Every
field can be overridden on the command line as ``--optim.lr 3e-4`` or ``--set optim.lr=3e-4``.

``Trainer`` runs the loop and is meant to be reused: pass your own ``model`` (e.g. with LoRA adapters and
frozen base weights: only parameters with ``requires_grad`` are optimized), ``train_data`` (any object with
``next_step() -> list[batch]``, ``state_dict()`` and ``load_state_dict()``; a batch is a dict with ``tokens``
and ``targets`` [B, T], -100 marking targets that do not count, and optionally ``attn_mask`` [B, 1, T, T])
and ``val_data`` (an iterable of batches).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import typing
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig, get_preset
from ..errors import UserError

# Sections ---------------------------------------------------------------------------------------------


@dataclass
class ModelSection:
    preset: str | None = "tiny"  # a llamaforge.config preset name
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields changed on the preset
    config: dict[str, Any] | None = None  # a custom shape: full ModelConfig fields (instead of preset)
    init_std: float = 0.02
    from_checkpoint: str | None = None  # start from these weights (any format llamaforge.load reads)


@dataclass
class DataSection:
    path: str = ""  # a directory made by `llamaforge prepare-data`
    seq_len: int = 256
    micro_batch_size: int = 8  # sequences per process per forward/backward
    grad_accum_steps: int = 1
    mix: dict[str, float] | None = None  # component weights; default: those given to prepare-data
    doc_mask: bool = False  # attend only within each packed document
    val_batches: int = 8  # micro-batches per process in each evaluation


@dataclass
class OptimSection:
    lr: float = 3e-4  # peak learning rate (the paper: 3e-4 for 7B/13B, 1.5e-4 for 33B/65B)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # matrices only
    warmup_steps: int = 2000
    decay_steps: int | None = None  # cosine length; default: train.steps
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    fused: bool | None = None  # fused AdamW kernel (default: where supported)


@dataclass
class TrainSection:
    steps: int = 1000  # optimizer steps
    seed: int = 1337
    out_dir: str = "runs/pretrain"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    parallel: str = "auto"  # auto (ddp when launched on several processes) | none | ddp | fsdp
    activation_checkpointing: bool = False
    compile: bool = False
    fused_loss: bool = True  # chunked output projection + cross-entropy (no full logits)
    log_interval: int = 10
    eval_interval: int = 200  # 0: only at the end
    ckpt_interval: int = 500  # 0: only at the end
    keep_last: int = 3  # checkpoints kept
    resume: str | bool = False  # true/auto: newest checkpoint in out_dir/checkpoints; or a path
    nan_policy: str = "skip"  # skip (up to max_bad_steps in a row) | stop
    max_bad_steps: int = 5
    timeout_s: float = 600.0  # process-group timeout: a dead rank fails the job
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU when not in the GPU table
    save: bool = True  # write checkpoints and the final export (off: a throwaway run, e.g. a benchmark)
    export_dir: str | None = None  # final Hugging Face directory (default: out_dir/final)
    export_tokenizer: str | None = None  # tokenizer to include (default: the data's tokenizer)


@dataclass
class LoggingSection:
    console: bool = True
    tensorboard: bool = False
    wandb_project: str | None = None
    run_name: str | None = None


@dataclass
class ParallelSection:
    """The device mesh: dp_shard x tp x pp processes (see ``train/mesh.py``); train.parallel picks DDP or FSDP2
    for the data-parallel dimension ("auto": FSDP2 once tp, pp or dp_shard is set)."""

    dp_shard: int = -1  # data-parallel ranks, FSDP2 shards over them; -1: the world size / (tp x pp)
    tp: int = 1  # tensor-parallel ranks: heads, FFN width and vocabulary split, sequence-parallel norms
    pp: int = 1  # pipeline ranks: the blocks split into stages; each step's grad_accum_steps are its micro-batches
    pp_schedule: str = "1F1B"  # GPipe | 1F1B | Interleaved1F1B
    pp_stages_per_rank: int | None = None  # default: 2 for Interleaved1F1B, else 1


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    # Construction ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> Recipe:
        data = dict(data or {})
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"{where}: unknown section(s) {unknown}; sections are "
                            f"{[f.name for f in dataclasses.fields(cls)]}")  # fmt: skip
        hints = typing.get_type_hints(cls)
        sections = {}
        for f in dataclasses.fields(cls):
            value = data.get(f.name) or {}
            if not isinstance(value, dict):
                raise UserError(f"{where}: section {f.name!r} must be a mapping, got {value!r}")
            sections[f.name] = _build_section(hints[f.name], value, f"{where}: {f.name}")
        recipe = cls(**sections)
        recipe.validate(where)
        return recipe

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, str] | None = None) -> Recipe:
        """Read a YAML recipe (or start from the defaults) and apply ``{"optim.lr": "3e-4", ...}``."""
        import yaml

        data: dict[str, Any] = {}
        where = "recipe"
        if path is not None:
            path = Path(path)
            if not path.exists():
                raise FileNotFoundError(f"no such recipe: {path}")
            data = yaml.safe_load(path.read_text()) or {}
            if not isinstance(data, dict):
                raise UserError(f"{path}: a recipe is a mapping of sections (model, data, optim, train, logging)")
            where = str(path)
        for key, raw in (overrides or {}).items():
            _set_dotted(data, key, yaml.safe_load(raw) if isinstance(raw, str) else raw)
        return cls.from_dict(data, where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self, where: str = "recipe") -> None:
        problems = []
        t, d, o = self.train, self.data, self.optim
        if t.precision not in ("auto", "bf16", "fp32"):
            problems.append(f"train.precision {t.precision!r} must be auto, bf16 or fp32")
        if t.parallel not in ("auto", "none", "ddp", "fsdp"):
            problems.append(f"train.parallel {t.parallel!r} must be auto, none, ddp or fsdp")
        if t.nan_policy not in ("skip", "stop"):
            problems.append(f"train.nan_policy {t.nan_policy!r} must be skip or stop")
        positive = {"train.steps": t.steps, "data.seq_len": d.seq_len, "data.micro_batch_size": d.micro_batch_size,
                    "data.grad_accum_steps": d.grad_accum_steps, "train.log_interval": t.log_interval}  # fmt: skip
        for name, value in positive.items():
            if value <= 0:
                problems.append(f"{name} must be positive, got {value}")
        if not o.lr > 0:
            problems.append(f"optim.lr must be positive, got {o.lr}")
        if not 0 <= o.min_lr_ratio <= 1:
            problems.append(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
        if self.model.preset is None and self.model.config is None and self.model.from_checkpoint is None:
            problems.append("model: give a preset, a custom config or from_checkpoint")
        problems.extend(self._parallel_problems())
        if problems:
            raise UserError(f"{where}: " + "; ".join(problems))

    def _parallel_problems(self) -> list[str]:
        from .mesh import PP_SCHEDULES

        p, problems = self.parallel, []
        for name in ("tp", "pp"):
            if getattr(p, name) < 1:
                problems.append(f"parallel.{name} must be at least 1, got {getattr(p, name)}")
        if p.dp_shard == 0 or p.dp_shard < -1:
            problems.append(f"parallel.dp_shard must be positive or -1 (the rest of the world), got {p.dp_shard}")
        if p.pp_schedule not in PP_SCHEDULES:
            problems.append(f"parallel.pp_schedule {p.pp_schedule!r} must be one of {', '.join(PP_SCHEDULES)}")
        if p.pp_stages_per_rank is not None and p.pp_stages_per_rank < 1:
            problems.append(f"parallel.pp_stages_per_rank must be at least 1, got {p.pp_stages_per_rank}")
        if p.tp > 1 and self.train.compile and self.train.activation_checkpointing:
            # measured on torch 2.13 (CPU, gloo): compiled tensor-parallel parts recomputed under checkpointing
            # give wrong gradients; each of the two alone with tensor parallelism matches one process
            problems.append("train.compile with train.activation_checkpointing and parallel.tp > 1 computes wrong "
                            "gradients in torch 2.13; turn one of them off")  # fmt: skip
        return problems

    def parallel_dims(self, world_size: int):
        """The concrete ``mesh.ParallelDims`` of this recipe on ``world_size`` processes (UserError if they
        do not fit)."""
        from .mesh import resolve_dims

        p = self.parallel
        return resolve_dims(world_size, self.train.parallel, p.dp_shard, p.tp, p.pp, p.pp_schedule,
                            p.pp_stages_per_rank)  # fmt: skip

    def model_config(self) -> ModelConfig:
        m = self.model
        try:
            if m.config is not None:
                return ModelConfig.from_dict({**m.config, **m.overrides})
            return get_preset(m.preset, **m.overrides)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"model: {exc.args[0] if exc.args else exc}") from exc


def _build_section(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {unknown}; fields are {sorted(names)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check/convert a YAML or command-line value to the field's type, naming the field on error."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{where}: expected a string, got {value!r}")
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return dict(value)
        raise UserError(f"{where}: expected a mapping, got {value!r}")
    return value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) < 2:
        raise UserError(f"override {key!r}: use section.field, e.g. optim.lr")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def recipe_fields() -> list[tuple[str, Any, Any]]:
    """(dotted name, type, default) for every field, for the command line's ``--section.field`` options."""
    out = []
    for section in dataclasses.fields(Recipe):
        cls = typing.get_type_hints(Recipe)[section.name]
        hints = typing.get_type_hints(cls)
        default = cls()
        for f in dataclasses.fields(cls):
            out.append((f"{section.name}.{f.name}", hints[f.name], getattr(default, f.name)))
    return out


# The loop ---------------------------------------------------------------------------------------------


class TrainingDiverged(UserError):  # noqa: N818 - reads as the event it reports
    """The loss or the gradient became NaN/Inf (and the recipe says to stop, or it kept happening)."""


class Killed(Exception):  # noqa: N818 - simulates an abrupt end in tests
    """Raised by a callback to end a run at once, with no final checkpoint (as a kill would)."""


Callback = Callable[[int, dict[str, Any]], None]


class Trainer:
    """Runs a recipe on 1..N processes (launched by torchrun). See the module docstring for reuse."""

    def __init__(self, recipe: Recipe, *, model: nn.Module | None = None, train_data: Any = None,
                 val_data: Iterable[dict[str, torch.Tensor]] | None = None, tokenizer: Any = None,
                 callbacks: Iterable[Callback] = ()) -> None:  # fmt: skip
        self.recipe = recipe
        self._model, self._train_data, self._val_data = model, train_data, val_data
        self.tokenizer = tokenizer
        self.callbacks = list(callbacks)
        self.history: list[dict[str, Any]] = []  # every step's metrics (every rank)
        self.val_history: list[dict[str, Any]] = []
        self.module: nn.Module | None = None  # the (parallelized) training module, after fit()
        self.runner: Any = None  # runs its steps (parallel.LocalRunner or pipeline.PipelineRunner), after fit()
        self.layout: Any = None  # this rank's place in the device mesh (mesh.Layout), after fit()
        self._tokenizer_tried = False

    # Setup --------------------------------------------------------------------------------------------
    def _build_model(self, device: torch.device) -> nn.Module:
        from ..model import build_model

        if self._model is not None:
            return self._model.to(device)
        m = self.recipe.model
        if m.from_checkpoint:
            from ..checkpoint import load_model
            from ..llm import resolve_source

            model, _ = load_model(resolve_source(m.from_checkpoint), device=device, dtype=torch.float32)
            for p in model.parameters():
                p.requires_grad_(True)
            return model
        model = build_model(self.recipe.model_config(), device=device, init=False)
        model.init_weights(std=m.init_std)
        return model

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        precision = self.recipe.train.precision
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        if precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # Run ------------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        from ..distributed import destroy_distributed, init_distributed, peer_lost

        info = init_distributed(self.recipe.train.device, self.recipe.train.timeout_s)
        try:
            return self._fit(info)
        except RuntimeError as exc:  # a collective failed because another rank died or hangs: say so plainly
            lost = peer_lost(exc, f"rank {info.rank} of {info.world_size}") if info.distributed else None
            if lost is None:
                raise
            raise lost from exc
        finally:
            destroy_distributed(info)

    def _model_config(self) -> ModelConfig:
        """The model's shape, known before any weight is allocated."""
        if self._model is not None:
            return self._model.config
        source = self.recipe.model.from_checkpoint
        if source:
            from ..checkpoint import detect_format, format_module

            return format_module(detect_format(source)).read_config(source)
        return self.recipe.model_config()

    def _fit(self, info) -> dict[str, Any]:
        from . import checkpointing as ckpt
        from .data import PackedLoader, ValidationSet
        from .logging import MetricsLogger, flops_per_token, format_train_line, peak_flops
        from .mesh import build_layout, check_model
        from .optim import build_optimizer, build_scheduler
        from .parallel import all_reduce_sum, clip_grad_norm, parallelize_model

        r, t, d, o = self.recipe, self.recipe.train, self.recipe.data, self.recipe.optim
        out_dir = Path(t.out_dir)
        device = info.device
        # The layout is checked against the world and the model's shape before any weight exists.
        dims = r.parallel_dims(info.world_size)
        check_model(dims, self._model_config(), d.seq_len, d.grad_accum_steps)
        layout = self.layout = build_layout(dims, device, info.rank)
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        model = self._build_model(device)
        config: ModelConfig = model.config
        self._config = config
        if d.seq_len > config.max_seq_len:
            raise UserError(f"data.seq_len {d.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
        n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        model_names = {f"model.{name}" for name in model.state_dict()}  # before a pipeline keeps some of them
        autocast = self._autocast(device)
        runner = parallelize_model(model, layout, device, self._loss_module(model, device),
                                   activation_checkpointing=t.activation_checkpointing, compile=t.compile,
                                   autocast=autocast, microbatches=d.grad_accum_steps)  # fmt: skip
        module = runner.module
        self.module, self.runner = module, runner
        optimizer = build_optimizer(module, o.lr, (o.beta1, o.beta2), o.eps, o.weight_decay, o.fused)
        scheduler = build_scheduler(optimizer, o.warmup_steps, o.decay_steps or t.steps, o.min_lr_ratio)
        params = [p for g in optimizer.param_groups for p in g["params"]]

        train_data = self._train_data
        if train_data is None:
            if not d.path:
                raise UserError("data.path is empty: point it at a directory made by `llamaforge prepare-data`")
            train_data = PackedLoader(d.path, d.seq_len, d.micro_batch_size, d.grad_accum_steps,
                                      rank=layout.dp_rank, world_size=layout.dp_size, seed=t.seed, mix=d.mix,
                                      doc_mask=d.doc_mask, device=device)  # fmt: skip
            if train_data.meta["vocab_size"] > config.vocab_size:
                raise UserError(f"{d.path}: tokenizer vocabulary ({train_data.meta['vocab_size']}) is larger than "
                                f"the model's vocab_size ({config.vocab_size})")  # fmt: skip
        val_data = self._val_data
        if val_data is None and d.path and d.val_batches > 0:
            val_data = ValidationSet(d.path, d.seq_len, d.micro_batch_size, d.val_batches, rank=layout.dp_rank,
                                     world_size=layout.dp_size, doc_mask=d.doc_mask, device=device)  # fmt: skip
            if len(val_data) == 0:
                if info.is_main:
                    have = len(val_data.stream)
                    need = d.micro_batch_size * layout.dp_size * d.seq_len + 1
                    warnings.warn(f"{d.path}: {have:,} validation tokens, fewer than one validation batch needs "
                                  f"({need:,} = data.micro_batch_size x data-parallel processes x data.seq_len + 1): "
                                  "this run reports no validation loss. Rerun `llamaforge prepare-data` with a "
                                  "larger --val-fraction (e.g. 0.1), or set data.val_batches=0 to train without "
                                  "validation", stacklevel=2)  # fmt: skip
                val_data = None

        logger = MetricsLogger(out_dir, info.rank, tensorboard=r.logging.tensorboard,
                               wandb_project=r.logging.wandb_project, run_name=r.logging.run_name,
                               config=r.to_dict(), console=r.logging.console)  # fmt: skip
        self._logger = logger
        try:
            start = 0
            resume_from = ckpt.find_resume_point(out_dir, t.resume)
            if resume_from is not None:
                state = ckpt.load_checkpoint(resume_from, module, optimizer, info.rank, model_names)
                scheduler.load_state_dict(state["scheduler"])
                # the learning rate follows this recipe's schedule (unchanged recipe: the same values)
                scheduler.base_lrs = [o.lr] * len(optimizer.param_groups)
                for group, lr in zip(optimizer.param_groups, _lambda_lrs(scheduler)):
                    group["lr"] = lr
                train_data.load_state_dict(state["data"])
                start = int(state["step"])
                logger.print(f"resumed from {resume_from} at step {start}")
            if info.is_main:
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / "recipe.yaml").write_text(r.to_yaml())
            fpt = flops_per_token(config, d.seq_len, n_params)
            peak = t.peak_flops or peak_flops(device)
            world = info.world_size
            bad_in_a_row, skipped = 0, 0
            window_tokens, window_start = 0, time.perf_counter()
            logger.print(f"training {n_params / 1e6:.1f}M parameters on {world} process(es) ({device}; "
                         f"{dims.describe()}), steps {start}->{t.steps}")  # fmt: skip
            last_metrics: dict[str, Any] = {}
            for step in range(start, t.steps):
                batches = train_data.next_step()
                # Tensor- and pipeline-parallel peers read the same batch: one of them counts it.
                counts = torch.tensor([sum(self._loss_units(b) for b in batches),
                                       sum(b["tokens"].numel() for b in batches)], dtype=torch.float64)  # fmt: skip
                n_targets, n_tokens = (int(x) for x in all_reduce_sum(counts.to(device) * layout.owns_data).tolist())
                # Gradients are averaged over the data-parallel ranks by DDP/FSDP, so scale by dp / global target
                # count: the step's gradient is that of the mean loss over every target in the global batch.
                scale = layout.dp_size / max(n_targets, 1.0)
                loss_sum, sums = runner.forward_backward(batches, scale)
                loss_sum = loss_sum.reshape(()).to(device, torch.float32)
                loss = all_reduce_sum(loss_sum * layout.owns_loss).item() / max(n_targets, 1.0)
                extra = _global_means({k: v * layout.owns_loss for k, v in sums.items()}, n_targets, device)
                grad_norm = clip_grad_norm(params, o.grad_clip, layout.pp_group)
                lr = optimizer.param_groups[0]["lr"]
                if math.isfinite(loss) and math.isfinite(grad_norm):
                    optimizer.step()
                    bad_in_a_row = 0
                else:
                    skipped += 1
                    bad_in_a_row += 1
                    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
                    if t.nan_policy == "stop" or bad_in_a_row > t.max_bad_steps:
                        raise TrainingDiverged(
                            f"training diverged: {what} at step {step + 1} (lr {lr:.3e}); "
                            f"{bad_in_a_row} bad step(s) in a row. No checkpoint was written for it; the last "
                            f"good one is under {out_dir / 'checkpoints'}. Lower optim.lr or raise warmup_steps."
                        )
                    logger.print(f"step {step + 1}: {what}, skipping the update ({bad_in_a_row} in a row)")
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                window_tokens += n_tokens
                metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens,
                           "skipped": skipped, **extra}  # fmt: skip
                done = step + 1
                if done % t.log_interval == 0 or done == t.steps:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    elapsed = time.perf_counter() - window_start
                    metrics["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                    metrics["mfu"] = (fpt * metrics["tokens_per_s"] / (peak * world)) if peak else None
                    logger.print(format_train_line(done, t.steps, metrics, self.console_metrics))
                    window_tokens, window_start = 0, time.perf_counter()
                logger.log(done, metrics, "train")
                self.history.append({"step": done, **metrics})
                if val_data is not None and ((t.eval_interval and done % t.eval_interval == 0) or done == t.steps):
                    val_loss = self.evaluate(module, val_data, autocast, device)
                    val_extra = {f"val_{k}": v for k, v in self.last_val_metrics.items()}
                    self.val_history.append({"step": done, "val_loss": val_loss, **val_extra})
                    logger.log(done, {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)), **val_extra}, "val")
                    shown = "".join(f" | {k} {self.last_val_metrics[k]:.4f}" for k in self.console_metrics
                                    if k in self.last_val_metrics)  # fmt: skip
                    logger.print(f"step {done}: val_loss {val_loss:.4f}{shown}")
                    window_start = time.perf_counter()  # evaluation is not training throughput
                if t.save and ((t.ckpt_interval and done % t.ckpt_interval == 0) or done == t.steps):
                    self._save(ckpt, out_dir, done, module, optimizer, scheduler, train_data, metrics, info)
                    window_start = time.perf_counter()
                last_metrics = metrics
                for callback in self.callbacks:
                    callback(done, metrics)
            export = self._export(module, out_dir, info, config, logger) if t.save else None
            return {"steps": t.steps, "start_step": start, "loss": last_metrics.get("loss"), "skipped": skipped,
                    "val_loss": self.val_history[-1]["val_loss"] if self.val_history else None,
                    "export_dir": str(export) if export else None, "n_params": n_params}  # fmt: skip
        finally:
            logger.close()

    @torch.no_grad()
    def evaluate(self, module: nn.Module, val_data: Iterable[dict[str, torch.Tensor]],
                 autocast: contextlib.AbstractContextManager | None = None,
                 device: torch.device | None = None) -> float:  # fmt: skip
        """Mean loss over ``val_data`` (all ranks together); the means of the loss module's other metrics go to
        ``self.last_val_metrics``."""
        from .loss import IGNORE_INDEX
        from .parallel import LocalRunner, add_sums, all_reduce_sum

        if self.runner is not None and module is self.module:  # the run's own layout (e.g. a pipeline)
            runner, owns_loss = self.runner, self.layout.owns_loss
        else:
            runner, owns_loss = LocalRunner(module, autocast=autocast), True
        device = device or next(module.parameters()).device
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        sums: dict[str, torch.Tensor] = {}

        def add(group: list[dict[str, torch.Tensor]]) -> None:
            part, count, more = runner.loss_sum(group)
            # tensor-parallel peers hold copies of the same sums, and only a pipeline's last stage has them
            totals[0] += part.double().to(device) * owns_loss
            totals[1] += count.double().to(device) * owns_loss
            add_sums(sums, {k: v * owns_loss for k, v in more.items()})

        was_training = module.training
        module.eval()  # no dropout (e.g. LoRA's) while measuring
        try:
            group: list[dict[str, torch.Tensor]] = []
            for batch in val_data:
                group.append(batch)
                if len(group) == runner.batches_per_call:
                    add(group)
                    group = []
            if group:  # a pipeline takes a fixed number of micro-batches: pad with batches that do not count
                filler = {**group[-1], "targets": torch.full_like(group[-1]["targets"], IGNORE_INDEX)}
                add(group + [filler] * (runner.batches_per_call - len(group)))
        finally:
            module.train(was_training)
        all_reduce_sum(totals)
        self.last_val_metrics = _global_means(sums, totals[1].item(), device)
        return (totals[0] / totals[1].clamp(min=1)).item()

    # Hooks for trainers of other objectives (see train/dpo.py) ---------------------------------------
    console_metrics: tuple[str, ...] = ()  # extra metrics shown on the console lines
    last_val_metrics: dict[str, float] = {}  # noqa: RUF012 - replaced, never mutated

    def _loss_module(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module the loop calls as ``module(**batch) -> (loss_sum, n_units[, {name: metric_sum}])``."""
        from .loss import CausalLMLoss

        t = self.recipe.train
        # Tensor parallelism and pipelines compute the loss from logits (split over the vocabulary under tensor
        # parallelism, with loss_parallel): the fused chunked loss needs the whole output matrix on one rank.
        split = self.layout is not None and (self.layout.dims.tp > 1 or self.layout.dims.pp > 1)
        # The loss's per-chunk softmax is compiled on accelerators only: on CPU its chunks stay in cache and the
        # compiled pass measured no faster (stories15M's head: 1.49 s vs 1.42 s eager per 2048 tokens).
        return CausalLMLoss(model, fused=t.fused_loss and not split, compile=t.compile and device.type != "cpu")

    def _loss_units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many units the loss of ``batch`` sums over (the step's loss is their mean): target tokens."""
        from .loss import IGNORE_INDEX

        return int((batch["targets"] != IGNORE_INDEX).sum())

    def _save(
        self,
        ckpt,
        out_dir: Path,
        step: int,
        module: nn.Module,
        optimizer,
        scheduler,
        train_data,
        metrics: dict[str, Any],
        info,
    ) -> None:
        from .parallel import all_reduce_sum

        bad = sum(int(not torch.isfinite(p.detach().to_local() if hasattr(p, "to_local") else p).all())
                  for p in module.parameters())  # fmt: skip
        if all_reduce_sum(torch.tensor(float(bad), device=info.device)).item():
            raise TrainingDiverged(f"step {step}: the weights contain NaN/Inf; refusing to write a checkpoint")
        state = {"step": step, "scheduler": scheduler.state_dict(), "data": train_data.state_dict(),
                 "metrics": {k: v for k, v in metrics.items() if v is not None}, "world_size": info.world_size,
                 "recipe": self.recipe.to_dict(), "model_config": self._config.to_dict()}  # fmt: skip
        # the tokenizer's files too, so that the checkpoint converts to a complete model directory
        tokenizer = self._export_tokenizer(self._logger) if info.is_main else None
        ckpt.save_checkpoint(out_dir / "checkpoints", step, module, optimizer, state, info.rank,
                             self.recipe.train.keep_last, tokenizer=tokenizer)  # fmt: skip

    def _export(self, module: nn.Module, out_dir: Path, info, config: ModelConfig, logger) -> Path | None:
        """Write the final weights as a Hugging Face directory (rank 0), tokenizer included when known."""
        from ..checkpoint import save_model
        from ..model import Transformer
        from .checkpointing import full_model_state
        from .parallel import barrier

        t = self.recipe.train
        target = Path(t.export_dir) if t.export_dir else out_dir / "final"
        state = full_model_state(module, self.layout)  # collective under FSDP, TP and PP
        if info.is_main:
            prefix = "model."
            weights = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}
            with torch.device("meta"):
                final = Transformer(config)
            final.load_state_dict(weights, assign=True, strict=False)
            final.tie_weights()
            tokenizer = self._export_tokenizer(logger)
            try:
                save_model(final, target, "hf", tokenizer=tokenizer)
                logger.print(f"wrote {target}")
            except (ImportError, NotImplementedError) as exc:
                logger.print(f"could not export a Hugging Face directory: {exc}")
                target = None
        barrier()
        return target if info.is_main else None

    def _export_tokenizer(self, logger) -> Any:
        if self.tokenizer is None and not self._tokenizer_tried:
            self._tokenizer_tried = True
            self.tokenizer = self._find_tokenizer(logger)
        return self.tokenizer

    def _find_tokenizer(self, logger) -> Any:
        source = self.recipe.train.export_tokenizer
        if source is None and self.recipe.data.path:
            from .data import read_meta

            source = read_meta(self.recipe.data.path).get("tokenizer")
        if not source:
            return None
        try:
            from .. import load_tokenizer

            return load_tokenizer(source)
        except Exception as exc:  # the weights are still worth writing without it
            logger.print(f"exporting without a tokenizer: cannot load {source}: {exc}")
            return None


def _global_means(sums: dict[str, torch.Tensor], units: float, device: torch.device) -> dict[str, float]:
    """Metric sums of every rank added up and divided by the global unit count (keys in the same order on every
    rank: the loss module returns the same ones)."""
    from .parallel import all_reduce_sum

    if not sums:
        return {}
    keys = sorted(sums)
    total = all_reduce_sum(torch.stack([sums[k] for k in keys]).to(device))
    return {k: v / max(units, 1.0) for k, v in zip(keys, total.tolist())}


def _lambda_lrs(scheduler: torch.optim.lr_scheduler.LambdaLR) -> list[float]:
    return [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]


def train(recipe: Recipe, **kwargs: Any) -> dict[str, Any]:
    """Run ``recipe``; see ``Trainer`` for the keyword arguments. Returns a summary of the run."""
    return Trainer(recipe, **kwargs).fit()
