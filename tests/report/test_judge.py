"""The judge (fastmem/report/judge.py) on hand-made run records: each verdict — holds, does not hold, inconclusive (an
interval or the seeds' spread reaches the threshold, or seeds are missing), not in regime (a precondition fails) — and
a threshold exactly on an interval's bound; claims survive their JSON round trip (sweep.json)."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from fastmem.experiments.claims import CLAIMS, claims_for
from fastmem.experiments.specs import SPECS
from fastmem.report.judge import Claim, Condition, Measure, RunView, judge, measure_per_seed
from fastmem.run.predictions import write_predictions, write_predictions_file

QUERIES = 2000
TRUTH = np.arange(QUERIES) % 10


def _predictions(correct_fraction: float, seed: int) -> np.ndarray:
    """Predictions of which exactly round(fraction × QUERIES) are right (which ones: seeded)."""
    rng = np.random.default_rng(seed)
    right = np.zeros(QUERIES, dtype=bool)
    right[rng.permutation(QUERIES)[: round(correct_fraction * QUERIES)]] = True
    return np.where(right, TRUTH, (TRUTH + 1) % 10)


def _run(root: Path, name: str, seed: int, untrained: float, final: float, fit: float,
         calibrated: float | None = None) -> RunView:
    run_dir = root / f"{name}-{seed}"
    write_predictions(run_dir, 0, OrderedDict(h=_predictions(untrained, 100 + seed)), TRUTH)
    write_predictions(run_dir, 10, OrderedDict(h=_predictions(final, 200 + seed)), TRUTH)
    if calibrated is not None:
        write_predictions_file(run_dir / "probe_predictions" / "untrained_bn_calibrated.npz",
                               OrderedDict(h=_predictions(calibrated, 300 + seed)), TRUTH)
    return RunView(run_dir, seed, 10, fit, 1792)


def _lift_claim(op: str = ">", threshold: float = 0.0, min_seeds: int = 1, baseline: str = "initial",
                preconditions: tuple[Condition, ...] = ()) -> Claim:
    return Claim("T.lift", "the lift", Measure("lift", "run", layer="h", baseline=baseline), op, threshold, "test",
                 preconditions, min_seeds)


def test_a_clear_lift_holds_and_a_clear_drop_does_not(tmp_path: Path) -> None:
    up = {"run": {0: _run(tmp_path, "up", 0, 0.60, 0.70, 0.2)}}
    verdict = judge(_lift_claim(), up)
    assert verdict.verdict == "holds" and "seed 0: +10.0 [" in verdict.detail
    down = {"run": {0: _run(tmp_path, "down", 0, 0.70, 0.60, 0.2)}}
    assert judge(_lift_claim(), down).verdict == "does not hold"
    assert judge(_lift_claim("<"), down).verdict == "holds"


def test_an_interval_that_reaches_the_threshold_is_inconclusive(tmp_path: Path) -> None:
    flat = {"run": {0: _run(tmp_path, "flat", 0, 0.65, 0.652, 0.2)}}
    interval = measure_per_seed(_lift_claim().measure, flat)[0]
    assert interval.low < 0 < interval.high
    assert judge(_lift_claim(), flat).verdict == "inconclusive"


def test_a_threshold_exactly_on_a_bound_is_not_beyond_it(tmp_path: Path) -> None:
    runs = {"run": {0: _run(tmp_path, "fit", 0, 0.6, 0.6, 0.5)}}
    fit = Claim("T.fit", "fit above", Measure("fit", "run"), ">", 0.0, "test")
    low = measure_per_seed(fit.measure, runs)[0].low
    at_bound = Claim("T.fit", "fit above", Measure("fit", "run"), ">", low, "test")
    below_bound = Claim("T.fit", "fit above", Measure("fit", "run"), ">", low - 1e-9, "test")
    assert judge(at_bound, runs).verdict == "inconclusive"
    assert judge(below_bound, runs).verdict == "holds"


def test_a_failed_precondition_is_not_in_regime_whatever_the_lift(tmp_path: Path) -> None:
    runs = {"run": {0: _run(tmp_path, "fitted", 0, 0.60, 0.70, 1.0)}}
    condition = Condition(Measure("fit", "run"), "<", 0.9, "the labels are not memorized one by one")
    verdict = judge(_lift_claim(preconditions=(condition,)), runs)
    assert verdict.verdict == "not in regime"
    assert "fit of “run” < 90 %" in verdict.detail and "100.0%" in verdict.detail


def test_seeds_missing_or_spread_across_the_threshold_are_inconclusive(tmp_path: Path) -> None:
    one = {"run": {0: _run(tmp_path, "one", 0, 0.60, 0.70, 0.2)}}
    verdict = judge(_lift_claim(min_seeds=3), one)
    assert verdict.verdict == "inconclusive" and "1 of the 3 seeds it needs (on it: holds)" in verdict.detail
    # Three seeds, each interval above 0, but the seeds disagree so much that their t-interval reaches 0.
    spread = {"run": {s: _run(tmp_path, "spread", s, 0.60, 0.60 + lift, 0.2) for s, lift in enumerate((0.06, 0.07, 0.38))}}
    per_seed = measure_per_seed(_lift_claim().measure, spread)
    assert all(v.low > 0 for v in per_seed.values())
    verdict = judge(_lift_claim(min_seeds=3), spread)
    assert verdict.verdict == "inconclusive" and "t-interval [" in verdict.detail
    steady = {"run": {s: _run(tmp_path, "steady", s, 0.60, 0.70 + 0.005 * s, 0.2) for s in range(3)}}
    assert judge(_lift_claim(min_seeds=3), steady).verdict == "holds"


def test_the_calibrated_baseline_and_differences_between_variants(tmp_path: Path) -> None:
    runs = {"run": {0: _run(tmp_path, "a", 0, 0.70, 0.72, 0.2, calibrated=0.60)},
            "other": {0: _run(tmp_path, "b", 0, 0.70, 0.62, 1.0)}}
    assert judge(_lift_claim(baseline="initial"), runs).verdict == "inconclusive"  # +2 points on 2,000 queries: ±2.8
    assert judge(_lift_claim(baseline="calibrated"), runs).verdict == "holds"  # +12 points
    difference = Claim("T.diff", "a above b", Measure("difference", "run", layer="h", other="other"), ">", 0.0, "t")
    assert judge(difference, runs).verdict == "holds"
    fits = Claim("T.fits", "a fits less", Measure("fit_difference", "run", other="other"), "<", 0.0, "t")
    assert judge(fits, runs).verdict == "holds"
    assert judge(_lift_claim(), {}).verdict == "inconclusive"  # nothing trained yet


def test_every_declared_claim_names_variants_of_its_experiment_and_round_trips() -> None:
    for experiment_id in CLAIMS:
        labels = {v.label for v in SPECS[experiment_id].variants("cpu")}
        for claim in claims_for(experiment_id, "cpu"):
            measures = [claim.measure, *(c.measure for c in claim.preconditions)]
            for measure in measures:
                assert measure.run in labels, (claim.id, measure.run)
                assert not measure.other or measure.other in labels, (claim.id, measure.other)
            assert Claim.from_dict(json.loads(json.dumps(claim.to_dict()))) == claim


@pytest.mark.parametrize("experiment_id", sorted(CLAIMS))
def test_no_claim_needs_fewer_seeds_than_the_issue_asks(experiment_id: str) -> None:
    needed = 3 if experiment_id in "ABCEGHJ" else 1 if experiment_id == "MAIN" else 2
    assert all(c.min_seeds >= needed for c in claims_for(experiment_id, "cpu"))
