"""Scores with standard errors and 95% confidence intervals, as Markdown tables and as JSON."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_output
from .metrics import confidence_interval

METRIC_NAMES = {"acc": "acc", "acc_norm": "acc (per char)", "acc_uncond": "acc (vs Answer:)"}


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)), as lm-evaluation-harness reports."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


@dataclass
class TaskResult:
    """The outcome of one task: per-item records and the metrics computed from them."""

    task: str
    title: str
    paper_metric: str
    metrics: tuple[str, ...]
    num_fewshot: int
    items: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # generative tasks: samples, throughput, sandbox

    @property
    def n(self) -> int:
        return len(self.items)

    def metric(self, name: str, group: str | None = None) -> tuple[float, float]:
        values = [float(it[name]) for it in self.items if group is None or it.get("group") == group]
        return mean_stderr(values)

    def ci(self, name: str) -> tuple[float, float]:
        """The 95% confidence interval of a metric (``metrics.confidence_interval``)."""
        return confidence_interval([float(it[name]) for it in self.items])

    def groups(self) -> list[str]:
        return sorted({it["group"] for it in self.items if it.get("group")})

    def to_dict(self, with_items: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"title": self.title, "n": self.n, "num_fewshot": self.num_fewshot,
                               "paper_metric": self.paper_metric, "seconds": round(self.seconds, 3)}  # fmt: skip
        for name in self.metrics:
            value, err = self.metric(name)
            out[name], out[f"{name}_stderr"] = value, _finite(err)
            out[f"{name}_ci95"] = [_finite(x) for x in self.ci(name)]
        groups = self.groups()
        if len(groups) > 1:
            out["groups"] = {g: {name: self.metric(name, g)[0] for name in self.metrics} | {
                "n": sum(it.get("group") == g for it in self.items)} for g in groups}  # fmt: skip
        out.update(self.extra)
        if with_items:
            out["items"] = self.items
        return out


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def markdown_table(results: Sequence[TaskResult]) -> str:
    """One row per task: the paper's metric first, then every metric the task reports, in percent."""
    columns = [m for m in METRIC_NAMES if any(m in r.metrics for r in results)]
    header = ["Task", "Shots", "n", "Paper metric", "Score (%)"] + [METRIC_NAMES[m] for m in columns]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---"] + ["---:"] * (1 + len(columns))) + "|",
    ]
    for r in results:
        value, err = r.metric(r.paper_metric)
        cells = [r.title, str(r.num_fewshot), str(r.n), METRIC_NAMES[r.paper_metric], _pct(value, err)]
        cells += [_pct(*r.metric(m)) if m in r.metrics else "" for m in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(value: float, err: float) -> str:
    if math.isnan(err):
        return f"{100 * value:.1f}"
    return f"{100 * value:.1f} ± {100 * err:.1f}"


def generative_table(results: Sequence[TaskResult]) -> str:
    """One row per generative task: the paper's metric with its 95% interval, the other metrics, throughput."""
    header = ["Task", "Shots", "n", "Samples", "Paper metric", "Score (%)", "95% CI", "Other metrics (%)", "Items/s",
              "Tokens/s"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|---|---:|---|---|---:|---:|"]
    for r in results:
        value, _ = r.metric(r.paper_metric)
        low, high = r.ci(r.paper_metric)
        others = ", ".join(f"{m} {100 * r.metric(m)[0]:.1f}" for m in r.metrics if m != r.paper_metric)
        cells = [r.title, str(r.num_fewshot), str(r.n), str(r.extra.get("num_samples", 1)), r.paper_metric,
                 f"{100 * value:.1f}", "" if math.isnan(low) else f"{100 * low:.1f} - {100 * high:.1f}", others,
                 f"{r.extra.get('items_per_second', 0):.2f}", f"{r.extra.get('tokens_per_second', 0):.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_json(results: Sequence[TaskResult], config: dict[str, Any], with_items: bool = False) -> dict[str, Any]:
    return {"results": {r.task: r.to_dict(with_items) for r in results}, "config": config}


def write_samples(path: str | os.PathLike, results: Sequence[TaskResult]) -> Path:
    """Every item of every task as one line of JSONL (``{"task": ..., **item}``), written atomically."""
    path = Path(path)
    with atomic_output(path, is_dir=False) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in results:
            for item in r.items:
                f.write(json.dumps({"task": r.task, **item}, default=str, ensure_ascii=False) + "\n")
    return path


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write `data` as JSON atomically (a temporary sibling renamed onto `path`)."""
    path = Path(path)
    with atomic_output(path, is_dir=False) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path
