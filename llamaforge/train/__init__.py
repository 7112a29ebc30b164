"""Pretraining with the LLaMA paper's recipe, and the pieces fine-tuning reuses: data preparation and
loading, AdamW with warm-up + cosine, the training loop, DDP/FSDP2, DCP checkpoints and logging."""

from .data import PackedLoader, Source, ValidationSet, load_mix, prepare_data, read_meta
from .loss import IGNORE_INDEX, CausalLMLoss, linear_cross_entropy
from .optim import build_optimizer, build_scheduler, lr_factor, param_groups
from .recipe import Recipe, Trainer, TrainingDiverged, train

__all__ = ["IGNORE_INDEX", "CausalLMLoss", "PackedLoader", "Recipe", "Source", "Trainer", "TrainingDiverged",
           "ValidationSet", "build_optimizer", "build_scheduler", "linear_cross_entropy", "load_mix",
           "lr_factor", "param_groups", "prepare_data", "read_meta", "train"]  # fmt: skip
