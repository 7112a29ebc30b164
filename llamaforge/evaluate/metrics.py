"""Estimators for the generative tasks: pass@k (Chen et al. 2021) and 95% confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from `n` samples of which `c` pass (Chen et al. 2021, eq. 1):
    ``1 - C(n - c, k) / C(n, k)``, computed as a product so that large n does not overflow."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (sound for small n and for 0% or 100%)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def confidence_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """95% interval of the mean of per-item scores: Wilson's when every score is 0 or 1, else the normal
    approximation (mean +- z * standard error, clipped to [0, 1]) for fractional scores such as pass@k."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    if all(v in (0, 1) for v in values):
        return wilson_interval(sum(values), n, z)
    mean = sum(values) / n
    if n == 1:
        return float("nan"), float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return max(0.0, mean - z * sd / math.sqrt(n)), min(1.0, mean + z * sd / math.sqrt(n))
