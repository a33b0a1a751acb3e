"""Intervals: Wilson against the quadratic it solves, bootstrap against the normal approximation, the paired
bootstrap zero-width for identical predictions and covering a planted difference at its nominal rate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastmem.run.stats import (
    Interval,
    bootstrap_interval,
    format_interval,
    paired_difference,
    seed_spread,
    wilson_interval,
)


@pytest.mark.parametrize(("hits", "n"), [(80, 100), (0, 20), (20, 20), (7_667, 10_000), (1, 3)])
def test_wilson_bounds_are_the_roots_of_the_score_equation(hits: int, n: int) -> None:
    # The Wilson bounds are the p with (p_hat - p)^2 = z^2 p (1 - p) / n: a quadratic a p^2 + b p + c = 0.
    z, p_hat = 1.959963984540054, hits / n
    a, b, c = 1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat
    root = math.sqrt(b * b - 4 * a * c)
    interval = wilson_interval(hits, n)
    assert interval.estimate == pytest.approx(p_hat)
    assert interval.low == pytest.approx(max(0.0, (-b - root) / (2 * a)), abs=1e-12)
    assert interval.high == pytest.approx(min(1.0, (-b + root) / (2 * a)), abs=1e-12)


def test_a_textbook_wilson_interval() -> None:
    interval = wilson_interval(80, 100)  # 0.80, 95 %: [0.7112, 0.8666] (Wilson 1927; Newcombe 1998, method 3)
    assert (round(interval.low, 4), round(interval.high, 4)) == (0.7112, 0.8666)


def test_bad_counts_are_refused() -> None:
    for hits, n in ((5, 0), (-1, 10), (11, 10)):
        with pytest.raises(ValueError):
            wilson_interval(hits, n)


def test_the_bootstrap_of_an_accuracy_matches_the_normal_approximation_at_large_n() -> None:
    correct = np.random.default_rng(1).random(10_000) < 0.767
    interval = bootstrap_interval(correct, seed=3)
    p = correct.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / correct.size)
    assert interval.estimate == pytest.approx(p)
    assert interval.low == pytest.approx(p - half, abs=8e-4)
    assert interval.high == pytest.approx(p + half, abs=8e-4)
    wilson = wilson_interval(int(correct.sum()), correct.size)
    assert interval.half_width == pytest.approx(wilson.half_width, rel=0.05)


def test_identical_predictions_give_a_zero_width_paired_interval() -> None:
    correct = np.random.default_rng(0).random(2_000) < 0.7
    difference = paired_difference(correct, correct)
    assert difference == Interval(0.0, 0.0, 0.0)
    assert not difference.excludes_zero()


def test_a_planted_difference_is_covered_and_excluded_from_zero() -> None:
    rng = np.random.default_rng(5)
    b = rng.random(10_000) < 0.75
    a = b.copy()
    a[np.flatnonzero(~b)[:400]] = True  # A also gets 400 queries right that B misses
    a[np.flatnonzero(b)[:100]] = False  # and misses 100 that B gets right: +3.0 points
    difference = paired_difference(a, b)
    assert difference.estimate == pytest.approx(0.03)
    assert difference.low < 0.03 < difference.high
    assert difference.excludes_zero()
    # Pairing matters: the unpaired intervals of A and B overlap far more than the paired one is wide.
    assert difference.half_width < 0.5 * (wilson_interval(int(a.sum()), a.size).half_width
                                          + wilson_interval(int(b.sum()), b.size).half_width)


def test_the_paired_interval_covers_the_true_difference_at_about_its_nominal_rate() -> None:
    # Queries drawn from a population where A beats B by exactly 2 points; 300 replications of 2,000 queries.
    rng = np.random.default_rng(11)
    outcomes = np.array([0.06, 0.04, 0.70, 0.20])  # P(A only), P(B only), P(both), P(neither)
    covered = 0
    for replication in range(300):
        kind = rng.choice(4, size=2_000, p=outcomes)
        a, b = np.isin(kind, (0, 2)), np.isin(kind, (1, 2))
        interval = paired_difference(a, b, resamples=2_000, seed=replication)
        covered += interval.low <= 0.02 <= interval.high
    assert 0.90 <= covered / 300 <= 0.985, covered


def test_paired_vectors_must_cover_the_same_queries() -> None:
    with pytest.raises(ValueError, match="same queries"):
        paired_difference(np.ones(5, bool), np.ones(6, bool))


def test_seed_spread_and_formatting() -> None:
    assert seed_spread([0.70, 0.72, 0.74]) == (pytest.approx(0.72), pytest.approx(0.02))
    assert seed_spread([0.5]) == (0.5, 0.0)
    assert format_interval(Interval(0.767, 0.759, 0.775)) == "76.7 ± 0.8"
