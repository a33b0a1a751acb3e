"""A sweep's runs as the report sees them: one `SweepRun` per run directory (one seed of one variant), grouped
into one `VariantRuns` per variant label, whose figures are aggregated over its seeds as entries
(fastmem/report/cells.py): with one seed each accuracy carries its 95 % Wilson interval over the probe's
queries and each lift over the untrained network its paired bootstrap interval; with several, the mean ± the
seeds' standard deviation. Runs without `probe_queries` or kept predictions (older formats) give bare values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from fastmem.report.cells import Value, delta_entry, seed_entry
from fastmem.report.intervals import accuracy_intervals, file_intervals, paired_deltas, paired_deltas_of
from fastmem.report.judge import CALIBRATED_FILE
from fastmem.run.metrics import RunRecords, knn_key
from fastmem.run.predictions import PREDICTIONS_DIR, predictions_path
from fastmem.run.stats import Interval, seed_spread, wilson_interval


@dataclass(frozen=True)
class SweepRun(RunRecords):
    """One run of a sweep (one seed of one variant): its metrics records (the RunRecords views) and its plan entry."""

    label: str = ""
    role: str = "run"
    value: float | None = None
    group: str = ""
    knobs: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    run_dir: Path | None = None

    @cached_property
    def final_intervals(self) -> Mapping[str, Interval]:
        return accuracy_intervals(self, self.final_probe_epoch) if self.probes else {}

    @cached_property
    def untrained_intervals(self) -> Mapping[str, Interval]:
        return accuracy_intervals(self, 0) if self.untrained else {}

    @cached_property
    def lifts(self) -> Mapping[str, Interval]:
        """Final − epoch-0 probe per probe point, paired over the same queries (empty without kept predictions)."""
        final = self.final_probe_epoch
        if self.run_dir is None or not self.untrained or not final:
            return {}
        return paired_deltas(self.run_dir, final, self.run_dir, 0)

    @cached_property
    def calibrated_intervals(self) -> Mapping[str, Interval]:
        """The BN-calibrated untrained network's accuracies (fastmem/probe/calibrated.py), where it was probed."""
        return file_intervals(self.run_dir / PREDICTIONS_DIR / CALIBRATED_FILE) if self.run_dir else {}

    @cached_property
    def calibrated_lifts(self) -> Mapping[str, Interval]:
        """Final − BN-calibrated untrained network per probe point, paired over the same queries."""
        final = self.final_probe_epoch
        if self.run_dir is None or not final:
            return {}
        return paired_deltas_of(predictions_path(self.run_dir, final), self.run_dir / PREDICTIONS_DIR / CALIBRATED_FILE)

    def final_value(self, layer: str) -> Value | None:
        """The last probe's accuracy at `layer`, with its interval where the query count is known."""
        return self.final_intervals.get(layer) or self.final_knn(layer)

    def untrained_value(self, layer: str) -> Value | None:
        return self.untrained_intervals.get(layer) or self.untrained_knn(layer)

    def lift_value(self, layer: str) -> Value | None:
        """Final − untrained at `layer`: the paired interval where predictions were kept, else the bare difference."""
        if layer in self.lifts:
            return self.lifts[layer]
        final, untrained = self.final_knn(layer), self.untrained_knn(layer)
        if final is None or untrained is None or not self.final_probe_epoch:
            return None
        return final - untrained

    def knn_band(self, layer: str) -> list[tuple[int, float, float, float]]:
        """(epoch, accuracy, low, high) per probe: the Wilson interval where the query count is known, else a point."""
        key, points = knn_key(layer), []
        for record in self.probes:
            if key not in record:
                continue
            accuracy, n = record[key], record.get("probe_queries")
            low, high = accuracy, accuracy
            if n:
                interval = wilson_interval(int(round(accuracy * n)), int(n))
                low, high = interval.low, interval.high
            points.append((int(record["epoch"]), accuracy, low, high))
        return points

    @property
    def untrained_signature(self) -> tuple[Any, ...]:
        """What identifies this run's untrained network in the report: its seed and epoch-0 accuracies."""
        return self.seed, tuple(sorted(self.untrained.items()))


def _entry(values: Sequence[tuple[int, Value | None]], delta: bool = False) -> dict[str, Any] | None:
    present = [(s, v) for s, v in values if v is not None]
    if not present:
        return None
    return delta_entry(present) if delta else seed_entry(present)


@dataclass(frozen=True)
class VariantRuns:
    """One variant of a sweep with its runs, one per seed (in seed order)."""

    label: str
    role: str
    value: float | None
    group: str
    knobs: Mapping[str, Any]
    runs: tuple[SweepRun, ...]

    @property
    def probed(self) -> list[SweepRun]:
        return [r for r in self.runs if r.probes]

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def config(self) -> Mapping[str, Any]:
        return next((r.config for r in self.runs if r.config), {})

    @property
    def layers(self) -> list[str]:
        return next((r.layers for r in self.runs if r.layers), [])

    @property
    def records(self) -> list[Mapping[str, Any]]:
        return [record for r in self.runs for record in r.records]

    @property
    def final_probe_epoch(self) -> int | None:
        return max((r.final_probe_epoch for r in self.probed), default=None)

    @property
    def epochs(self) -> list[int]:
        """The last trained epoch of each run that has trained."""
        return [int(r.fits[-1]["epoch"]) for r in self.runs if r.fits]

    def final(self, layer: str) -> dict[str, Any] | None:
        return _entry([(r.seed, r.final_value(layer)) for r in self.probed])

    def untrained(self, layer: str) -> dict[str, Any] | None:
        return _entry([(r.seed, r.untrained_value(layer)) for r in self.probed])

    def lift(self, layer: str) -> dict[str, Any] | None:
        return _entry([(r.seed, r.lift_value(layer)) for r in self.probed], delta=True)

    def calibrated(self, layer: str) -> dict[str, Any] | None:
        return _entry([(r.seed, r.calibrated_intervals.get(layer)) for r in self.probed])

    def calibrated_lift(self, layer: str) -> dict[str, Any] | None:
        return _entry([(r.seed, r.calibrated_lifts.get(layer)) for r in self.probed], delta=True)

    @property
    def fit(self) -> dict[str, Any] | None:
        return _entry([(r.seed, r.final_fit) for r in self.runs])

    @property
    def agree(self) -> dict[str, Any] | None:
        return _entry([(r.seed, r.final_agree) for r in self.runs])

    @property
    def untrained_signature(self) -> tuple[Any, ...]:
        return tuple(r.untrained_signature for r in self.probed if r.untrained)

    def knn_band(self, layer: str) -> list[tuple[int, float, float, float]]:
        """(epoch, accuracy, low, high) over training: one seed's Wilson band, or the mean ± sd over the seeds that
        probed that epoch."""
        curves = [r.knn_band(layer) for r in self.probed]
        if len(curves) == 1:
            return curves[0]
        by_epoch: dict[int, list[float]] = {}
        for curve in curves:
            for epoch, accuracy, _, _ in curve:
                by_epoch.setdefault(epoch, []).append(accuracy)
        return [(epoch, mean, mean - sd, mean + sd)
                for epoch, values in sorted(by_epoch.items()) for mean, sd in [seed_spread(values)]]

    def fit_band(self) -> list[tuple[int, float, float, float]]:
        """(epoch, fit, low, high): mean ± sd over seeds (one seed: no band)."""
        by_epoch: dict[int, list[float]] = {}
        for run in self.runs:
            for epoch, fit in run.fit_curve():
                by_epoch.setdefault(epoch, []).append(fit)
        return [(epoch, mean, mean - sd, mean + sd)
                for epoch, values in sorted(by_epoch.items()) for mean, sd in [seed_spread(values)]]


def group_runs(runs: Sequence[SweepRun]) -> list[VariantRuns]:
    """One VariantRuns per label, in order of first appearance, its runs in seed order."""
    grouped: dict[str, list[SweepRun]] = {}
    for run in runs:
        grouped.setdefault(run.label, []).append(run)
    return [VariantRuns(label, members[0].role, members[0].value, members[0].group, members[0].knobs,
                        tuple(sorted(members, key=lambda r: r.seed))) for label, members in grouped.items()]


def shared_untrained(variants: Sequence[VariantRuns]) -> bool:
    """Whether every variant's untrained networks are the same (same seeds, same epoch-0 accuracies)."""
    return len({v.untrained_signature for v in variants if v.untrained_signature}) <= 1
