"""Training logs: a console line per interval, JSONL metrics always, TensorBoard or Weights & Biases on
request (imported only then; a missing package is reported once and skipped), and MFU where the
accelerator's peak FLOP rate is known."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig

METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak FLOP/s per device (vendor data sheets), matched against torch.cuda.get_device_name().
_PEAK_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("A10G", 125e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
    ("V100", 125e12), ("T4", 65e12),
]  # fmt: skip


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of ``device`` when known (CUDA GPUs in the table); None on CPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in _PEAK_FLOPS:
        if key in name:
            return flops
    return None


def flops_per_token(config: ModelConfig, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x non-embedding-lookup parameters plus attention
    scores, 12 x layers x heads x head_dim x seq_len (PaLM, appendix B)."""
    embedding = config.vocab_size * config.dim if not config.tie_embeddings else 0
    attention = 12 * config.n_layers * config.n_heads * config.dim_per_head * seq_len
    return 6 * (n_params - embedding) + attention


class MetricsLogger:
    """Writes metrics on rank 0: ``<out_dir>/metrics.jsonl`` always, plus TensorBoard / W&B when asked."""

    def __init__(self, out_dir: str | Path, rank: int = 0, *, tensorboard: bool = False,
                 wandb_project: str | None = None, run_name: str | None = None,
                 config: dict[str, Any] | None = None, console: bool = True) -> None:  # fmt: skip
        self.active = rank == 0
        self.console = console and self.active
        self.out_dir = Path(out_dir)
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not self.active:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.out_dir / METRICS_FILE).open("a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
            except ImportError:
                self.print("tensorboard requested but not installed (pip install tensorboard); skipping it")
        if wandb_project:
            try:
                import wandb

                self._wandb = wandb.init(project=wandb_project, name=run_name, config=config or {},
                                         dir=str(self.out_dir))  # fmt: skip
            except ImportError:
                self.print("wandb requested but not installed (pip install wandb); skipping it")

    def print(self, line: str) -> None:
        if self.console:
            print(line, file=sys.stderr, flush=True)

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        if not self.active:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(record, default=float) + "\n")
        self._jsonl.flush()
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(f"{kind}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in numeric.items()}, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def format_train_line(step: int, total: int, m: dict[str, Any], extra: Sequence[str] = ()) -> str:
    """One console line per logged step; ``extra`` names further metrics to show (e.g. DPO's rewards)."""
    parts = [f"step {step:>{len(str(total))}}/{total}", f"loss {m['loss']:.4f}",
             *(f"{k} {m[k]:.4f}" for k in extra if k in m), f"lr {m['lr']:.3e}", f"grad_norm {m['grad_norm']:.3f}",
             f"tok/s {m['tokens_per_s']:,.0f}"]  # fmt: skip
    if m.get("mfu") is not None:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    if m.get("skipped"):
        parts.append(f"skipped {m['skipped']}")
    return " | ".join(parts)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file (or of ``<dir>/metrics.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no metrics file: {path}")
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records
