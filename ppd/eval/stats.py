"""Statistics of the evaluation: win rates with bootstrap confidence intervals, rank correlation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


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
    """Mean of `values` with a percentile bootstrap 95% CI (`scipy.stats.bootstrap`).

    With `groups` (e.g. user ids), whole groups are resampled: comparisons of one user are not independent, so
    resampling users gives the honest interval for "a new user drawn from the same population". A resample's
    statistic is then the mean over every comparison of the groups drawn (groups weighted by their size).
    """
    values = np.asarray(values, float)
    if values.size == 0:
        return Estimate(float("nan"), (float("nan"), float("nan")), 0)
    mean = float(values.mean())
    if groups is None:
        data, statistic = values, np.mean
    else:
        labels, inverse = np.unique(np.asarray(groups), return_inverse=True)
        sums = np.bincount(inverse, weights=values, minlength=len(labels))  # per group
        counts = np.bincount(inverse, minlength=len(labels)).astype(float)
        data = np.arange(len(labels))  # resampled: group indices

        def statistic(drawn: np.ndarray, axis: int = -1) -> np.ndarray:
            return sums[drawn].sum(axis=axis) / counts[drawn].sum(axis=axis)

    if data.size < 2:  # one observation (or one group): every resample is the sample itself
        return Estimate(mean, (mean, mean), int(values.size))
    result = stats.bootstrap(
        (data,),
        statistic,
        n_resamples=samples,
        method="percentile",
        confidence_level=0.95,
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return Estimate(mean, (float(interval.low), float(interval.high)), int(values.size))


def win_rate(
    scores: np.ndarray,
    baseline_scores: np.ndarray,
    samples: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> Estimate:
    """Share of paired comparisons won against the baseline (ties count half), with a bootstrap CI."""
    return bootstrap_mean(win_outcomes(scores, baseline_scores), samples=samples, seed=seed, groups=groups)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:  # scipy would warn and answer NaN
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)
