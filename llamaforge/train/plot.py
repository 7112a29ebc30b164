"""``llamaforge plot``: loss curves of one or more runs (their metrics.jsonl) drawn to a PNG."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..checkpoint import atomic_output
from .logging import read_metrics


def _series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    by_step: dict[int, float] = {}
    for r in records:  # a resumed run appends: the latest record of a step wins
        value = r.get(key)
        if r.get("kind") == kind and isinstance(value, (int, float)) and math.isfinite(value):
            by_step[int(r["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(runs: Sequence[str | Path], output: str | Path, smooth: int = 1, labels: Sequence[str] | None = None,
              log_y: bool = False, title: str | None = None) -> Path:  # fmt: skip
    """Draw training loss (lines) and validation loss (markers) of ``runs`` (directories or metrics files)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("llamaforge plot needs matplotlib: pip install matplotlib") from exc
    output = Path(output)
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for i, run in enumerate(runs):
        records = read_metrics(run)
        label = labels[i] if labels and i < len(labels) else Path(run).name
        steps, loss = _series(records, "train", "loss")
        if steps:
            line = ax.plot(steps, _smooth(loss, smooth), label=f"{label} train", linewidth=1.2)[0]
            drawn += 1
        else:
            line = None
        vsteps, vloss = _series(records, "val", "val_loss")
        if vsteps:
            color = line.get_color() if line is not None else None
            ax.plot(vsteps, vloss, "o--", color=color, label=f"{label} validation", markersize=4)
            drawn += 1
    if not drawn:
        plt.close(fig)
        raise ValueError(f"no loss values in {', '.join(map(str, runs))}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "training loss")
    fig.tight_layout()
    with atomic_output(output, is_dir=False) as tmp:
        fig.savefig(tmp, format=output.suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    return output
