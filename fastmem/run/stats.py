"""Uncertainty of the accuracies fastmem reports: intervals over queries, paired differences, spread over seeds.

- `wilson_interval`: the 95 % Wilson score interval of an accuracy of `hits` out of `n` queries.
- `bootstrap_interval`: the percentile bootstrap over queries of one accuracy (for correctness vectors).
- `paired_difference`: accuracy A − accuracy B on the *same* queries, with a paired bootstrap interval.
  The resampled difference of two 0/1 vectors depends only on how many queries each gets right and the
  other wrong, so it is drawn exactly from a multinomial over the four (A, B) outcomes — no index matrix.
  Identical predictions give a zero-width interval.
- `seed_spread`: mean and sample standard deviation over seeds.
- `format_interval`: `76.7 ± 0.8` (percent, half the interval's width).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


@dataclass(frozen=True)
class Interval:
    """An estimate with its lower and upper confidence bounds (fractions, not percent)."""

    estimate: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


def wilson_interval(hits: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """The Wilson score interval of the proportion hits / n."""
    if n <= 0 or not 0 <= hits <= n:
        raise ValueError(f"need 0 <= hits <= n and n > 0, got hits={hits}, n={n}")
    z = _z(confidence)
    p = hits / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def _correct(vector: np.ndarray | Sequence[bool]) -> np.ndarray:
    array = np.asarray(vector)
    if array.ndim != 1 or array.size == 0:
        raise ValueError("expected a non-empty 1-D vector of per-query correctness")
    return array.astype(bool)


def bootstrap_interval(correct: np.ndarray | Sequence[bool], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                       confidence: float = CONFIDENCE) -> Interval:
    """The percentile bootstrap interval, over queries, of the accuracy of a 0/1 correctness vector."""
    hits = _correct(correct)
    n = hits.size
    draws = np.random.default_rng(seed).binomial(n, hits.mean(), size=resamples) / n  # exact for a 0/1 mean
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return Interval(float(hits.mean()), float(low), float(high))


def paired_difference(correct_a: np.ndarray | Sequence[bool], correct_b: np.ndarray | Sequence[bool], *,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE) -> Interval:
    """accuracy(A) − accuracy(B) over the same queries, with its paired bootstrap interval."""
    a, b = _correct(correct_a), _correct(correct_b)
    if a.shape != b.shape:
        raise ValueError(f"paired vectors must cover the same queries: {a.size} vs {b.size}")
    n = a.size
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    counts = np.random.default_rng(seed).multinomial(n, [only_a / n, only_b / n, 1 - (only_a + only_b) / n],
                                                     size=resamples)
    draws = (counts[:, 0] - counts[:, 1]) / n
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return Interval((only_a - only_b) / n, float(low), float(high))


def seed_spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) over seeds; the deviation is 0 for a single seed."""
    if not values:
        raise ValueError("no values to aggregate")
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def format_interval(interval: Interval, digits: int = 1) -> str:
    """`76.7 ± 0.8`: the estimate and half the interval's width, in percent."""
    return f"{100 * interval.estimate:.{digits}f} ± {100 * interval.half_width:.{digits}f}"
