"""Claims as data, verdicts by code: each PROTOCOL claim is a `Claim` (declared once, in fastmem/experiments/claims.py,
and written into every sweep's sweep.json), and `judge` computes its verdict from the runs' records alone.

A claim compares one *measure* with a preregistered threshold (`op` '>' or '<', in fractions: 0.02 = 2 points):
- `lift`: a variant's final k-NN accuracy at a probe point minus its untrained network's, paired over the same
  queries — `baseline` 'initial' (the run's epoch-0 probe, BatchNorm's initial statistics) or 'calibrated' (the same
  weights, BN statistics re-estimated on the training images: fastmem/probe/calibrated.py);
- `difference`: a variant's final k-NN accuracy minus another variant's (same seed, same queries, paired);
- `fit`: a variant's fit of its own (random) labels over the last epoch, with its Wilson interval over the samples
  of that epoch;
- `fit_difference`: one variant's fit minus another's (same seed), Newcombe's interval from the two Wilson intervals.

Verdicts, in this order:
- **not in regime**: a precondition (a measure compared with a stated level, on every seed's estimate) fails, e.g.
  "the model does not fit the labels one by one": fit < 0.9. The claim says nothing where its regime is absent.
- **inconclusive**: fewer seeds than the claim needs (the verdict those seeds would give is shown), or some seed's
  95 % interval — or, with several seeds, the seeds' 95 % t-interval of the mean — reaches the threshold.
- **holds**: every seed's interval lies strictly beyond the threshold on the claimed side, and so does the seeds'
  t-interval (with ≥ 2 seeds). **does not hold**: all of them lie strictly on the other side.
A bound exactly on the threshold is not beyond it (inconclusive).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastmem.run.predictions import PREDICTIONS_DIR, predictions_path, read_predictions
from fastmem.run.stats import Interval, paired_difference, seed_spread, wilson_interval

VERDICTS = ("holds", "does not hold", "inconclusive", "not in regime")
MEASURES = ("lift", "difference", "fit", "fit_difference")
BASELINES = {"initial": "untrained, initial BN (epoch-0 probe)", "calibrated": "untrained, BN calibrated"}
CALIBRATED_FILE = "untrained_bn_calibrated.npz"
# Two-sided 95 % quantiles of Student's t, by degrees of freedom (the seeds' interval of a mean).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass(frozen=True)
class Measure:
    kind: str  # one of MEASURES
    run: str  # the variant's label
    layer: str = ""  # probe point (lift, difference)
    baseline: str = "initial"  # lift: a key of BASELINES
    other: str = ""  # difference, fit_difference: the variant subtracted

    def describe(self) -> str:
        if self.kind == "lift":
            return f"{self.layer} lift of “{self.run}” over {BASELINES[self.baseline]}"
        if self.kind == "difference":
            return f"{self.layer} of “{self.run}” − “{self.other}”"
        if self.kind == "fit":
            return f"fit of “{self.run}”"
        return f"fit of “{self.run}” − fit of “{self.other}”"


@dataclass(frozen=True)
class Condition:
    """A precondition of a claim's regime: `measure` op `threshold` on every seed's estimate."""

    measure: Measure
    op: str
    threshold: float
    why: str


@dataclass(frozen=True)
class Claim:
    id: str
    statement: str
    measure: Measure
    op: str  # '>' or '<'
    threshold: float  # fraction (0.02 = 2 points)
    why: str = ""  # why this comparison (and this baseline) tests the claim
    preconditions: tuple[Condition, ...] = ()
    min_seeds: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Claim:
        conditions = tuple(Condition(Measure(**c["measure"]), c["op"], float(c["threshold"]), c["why"])
                           for c in data.get("preconditions", ()))
        return cls(data["id"], data["statement"], Measure(**data["measure"]), data["op"], float(data["threshold"]),
                   data.get("why", ""), conditions, int(data.get("min_seeds", 1)))


@dataclass(frozen=True)
class RunView:
    """What the judge reads of one run: where its records are, its seed, fit and sample count of the last epoch."""

    run_dir: Path
    seed: int
    final_epoch: int | None
    fit: float | None
    fit_samples: int


@dataclass
class Verdict:
    claim: Claim
    verdict: str
    detail: str
    per_seed: dict[int, Interval] = field(default_factory=dict)

    def line(self) -> str:
        return f"**{self.claim.id} — {self.verdict}.** {self.claim.statement}: {self.detail}"


def _correct(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
    if not path.exists():
        return None
    predictions, truth = read_predictions(path)
    return {layer: p == truth for layer, p in predictions.items()}, truth


def _paired(a: tuple[dict[str, np.ndarray], np.ndarray] | None, b: tuple[dict[str, np.ndarray], np.ndarray] | None,
            layer: str) -> Interval | None:
    if a is None or b is None or layer not in a[0] or layer not in b[0] or not np.array_equal(a[1], b[1]):
        return None
    return paired_difference(a[0][layer], b[0][layer])


def _fit_interval(run: RunView) -> Interval | None:
    if run.fit is None or run.fit_samples <= 0:
        return None
    return wilson_interval(int(round(run.fit * run.fit_samples)), run.fit_samples)


def _newcombe(a: Interval, b: Interval) -> Interval:
    """a − b of two independent proportions with Newcombe's hybrid score interval (from their Wilson intervals)."""
    d = a.estimate - b.estimate
    low = d - math.hypot(a.estimate - a.low, b.high - b.estimate)
    high = d + math.hypot(a.high - a.estimate, b.estimate - b.low)
    return Interval(d, low, high)


def measure_per_seed(measure: Measure, runs: Mapping[str, Mapping[int, RunView]]) -> dict[int, Interval]:
    """The measure on every seed that has what it needs (runs finished and probed, predictions kept)."""
    mine = runs.get(measure.run, {})
    theirs = runs.get(measure.other, {}) if measure.other else {}
    values: dict[int, Interval] = {}
    for seed, run in sorted(mine.items()):
        value: Interval | None = None
        if measure.kind == "lift" and run.final_epoch:
            baseline = (predictions_path(run.run_dir, 0) if measure.baseline == "initial"
                        else run.run_dir / PREDICTIONS_DIR / CALIBRATED_FILE)
            value = _paired(_correct(predictions_path(run.run_dir, run.final_epoch)), _correct(baseline), measure.layer)
        elif measure.kind == "difference" and seed in theirs and run.final_epoch and theirs[seed].final_epoch:
            other = theirs[seed]
            value = _paired(_correct(predictions_path(run.run_dir, run.final_epoch)),
                            _correct(predictions_path(other.run_dir, other.final_epoch)), measure.layer)  # type: ignore[arg-type]
        elif measure.kind == "fit":
            value = _fit_interval(run)
        elif measure.kind == "fit_difference" and seed in theirs:
            a, b = _fit_interval(run), _fit_interval(theirs[seed])
            value = _newcombe(a, b) if a is not None and b is not None else None
        if value is not None:
            values[seed] = value
    return values


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _beyond(low: float, high: float, op: str, threshold: float) -> tuple[bool, bool]:
    """(entirely on the claimed side, entirely on the other side) of the threshold, strictly."""
    if op == ">":
        return low > threshold, high < threshold
    return high < threshold, low > threshold


def seeds_interval(values: Sequence[float]) -> Interval:
    """The mean over seeds with its 95 % t-interval (the seeds' spread); a single seed gives a point."""
    mean, sd = seed_spread(list(values))
    if len(values) < 2:
        return Interval(mean, mean, mean)
    half = T_975.get(len(values) - 1, 1.96) * sd / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half)


def _describe(values: Mapping[int, Interval], kind: str) -> str:
    unit = "%" if kind == "fit" else ""
    fmt = (lambda v: f"{100 * v:.1f}") if kind == "fit" else _points
    seeds = "; ".join(f"seed {s}: {fmt(v.estimate)}{unit} [{fmt(v.low)}, {fmt(v.high)}]" for s, v in values.items())
    if len(values) > 1:
        spread = seeds_interval([v.estimate for v in values.values()])
        sd = seed_spread([v.estimate for v in values.values()])[1]
        seeds += f"; mean {fmt(spread.estimate)}{unit} ± {100 * sd:.1f} sd, t-interval [{fmt(spread.low)}, {fmt(spread.high)}]"
    return seeds


def judge(claim: Claim, runs: Mapping[str, Mapping[int, RunView]]) -> Verdict:
    """The claim's verdict from the runs' records (see the module docstring)."""
    values = measure_per_seed(claim.measure, runs)
    level = f"{claim.op} {_points(claim.threshold) if claim.measure.kind != 'fit' else f'{100 * claim.threshold:.0f} %'}"
    if not values:
        return Verdict(claim, "inconclusive", "no finished runs (with kept predictions where it compares probes) "
                       f"for {claim.measure.describe()}")
    for condition in claim.preconditions:
        checked = measure_per_seed(condition.measure, runs)
        failing = {s: v for s, v in checked.items()
                   if not (v.estimate > condition.threshold if condition.op == ">" else v.estimate < condition.threshold)}
        if failing or not checked:
            shown = _describe(failing or checked, condition.measure.kind) if (failing or checked) else "not measured"
            return Verdict(claim, "not in regime",
                           f"precondition {condition.measure.describe()} {condition.op} "
                           f"{100 * condition.threshold:g}{' %' if condition.measure.kind == 'fit' else ' points'} "
                           f"({condition.why}) fails: {shown}", values)
    claimed = [_beyond(v.low, v.high, claim.op, claim.threshold) for v in values.values()]
    spread = seeds_interval([v.estimate for v in values.values()])
    spread_claimed, spread_other = _beyond(spread.low, spread.high, claim.op, claim.threshold)
    several = len(values) > 1
    if all(c for c, _ in claimed) and (spread_claimed or not several):
        outcome = "holds"
    elif all(o for _, o in claimed) and (spread_other or not several):
        outcome = "does not hold"
    else:
        outcome = "inconclusive"
    detail = f"{claim.measure.describe()} {level}: {_describe(values, claim.measure.kind)}"
    if len(values) < claim.min_seeds:
        return Verdict(claim, "inconclusive", f"{len(values)} of the {claim.min_seeds} seeds it needs (on "
                       f"{'it' if len(values) == 1 else 'them'}: {outcome}); {detail}", values)
    return Verdict(claim, outcome, detail, values)


def judge_all(claims: Sequence[Claim], runs: Mapping[str, Mapping[int, RunView]]) -> list[Verdict]:
    return [judge(claim, runs) for claim in claims]
