"""Statistics of the evaluation: win rates with bootstrap confidence intervals, rank correlation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% bootstrap confidence interval."""

    value: float
    ci95: tuple[float, float]
    n: int

    def as_dict(self) -> dict:
        return {"value": self.value, "ci95": list(self.ci95), "n": self.n}


# Two scores closer than this are a tie. The same model on the same (caption, seed) can come out a few pixels one grey
# level apart when its rows are batched differently (CPU kernels pick other blockings per batch shape); on a 32 x 32
# toy image one grey level in one pixel moves an O(1) reward by ~4e-6, and no judge sees 25 such pixels.
TIE_TOLERANCE = 1e-4


def win_outcomes(scores: np.ndarray, baseline_scores: np.ndarray, tie_tolerance: float = TIE_TOLERANCE) -> np.ndarray:
    """Per comparison: 1 if `scores` beats the baseline, 0.5 for a tie (within `tie_tolerance`), 0 otherwise."""
    scores, baseline_scores = np.asarray(scores, float), np.asarray(baseline_scores, float)
    if scores.shape != baseline_scores.shape:
        raise ValueError(f"paired scores differ in shape: {scores.shape} vs {baseline_scores.shape}")
    tied = np.abs(scores - baseline_scores) <= tie_tolerance
    return np.where(tied, 0.5, np.where(scores > baseline_scores, 1.0, 0.0))


def bootstrap_mean(
    values: np.ndarray, samples: int = 1000, seed: int = 0, groups: np.ndarray | None = None
) -> Estimate:
    """Mean of `values` with a percentile bootstrap 95% CI.

    With `groups` (e.g. user ids), whole groups are resampled: comparisons of one user are not independent, so
    resampling users gives the honest interval for "a new user drawn from the same population".
    """
    values = np.asarray(values, float)
    if values.size == 0:
        return Estimate(float("nan"), (float("nan"), float("nan")), 0)
    rng = np.random.default_rng(seed)
    if groups is None:
        draws = rng.integers(0, values.size, (samples, values.size))
        means = values[draws].mean(axis=1)
    else:
        groups = np.asarray(groups)
        labels, inverse = np.unique(groups, return_inverse=True)
        sums = np.bincount(inverse, weights=values, minlength=len(labels))  # per group
        counts = np.bincount(inverse, minlength=len(labels)).astype(float)
        draws = rng.integers(0, len(labels), (samples, len(labels)))
        means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Estimate(float(values.mean()), (float(low), float(high)), int(values.size))


def win_rate(
    scores: np.ndarray,
    baseline_scores: np.ndarray,
    samples: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> Estimate:
    """Share of paired comparisons won against the baseline (ties count half), with a bootstrap CI."""
    return bootstrap_mean(win_outcomes(scores, baseline_scores), samples=samples, seed=seed, groups=groups)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks."""
    values = np.asarray(values, float)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN when either side is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])
