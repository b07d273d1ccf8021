"""Summary statistics for result tables: means with percentile-bootstrap confidence intervals."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MeanCI:
    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_ci(values, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> MeanCI:
    """Mean and percentile-bootstrap CI (Efron & Tibshirani 1993, §13.3) of the mean; NaNs are dropped.

    When values are per-prompt means, the resampling unit is the prompt, as in the benchmark tables.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return MeanCI(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return MeanCI(float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)), int(x.size))
