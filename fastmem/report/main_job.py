"""The main job's figures: per layer, the untrained network, each run's final probe and the paired lift
over the untrained network, with 95 % intervals (and the spread over seeds when there are several);
the claims of PROTOCOL.md's experiment A judged on them; summary.json and the markdown table.

Runs come as `{label: [(seed, run_dir), …]}`; every run's epoch-0 probe is its own untrained network
(the same initialisation as its training), so a lift is always paired on one seed's queries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastmem.report.cells import cell as _cell
from fastmem.report.cells import delta_entry as _delta_entry
from fastmem.report.cells import seed_entry as _entry
from fastmem.report.intervals import accuracy_intervals, file_intervals, paired_deltas, paired_deltas_of
from fastmem.report.judge import CALIBRATED_FILE, Claim, RunView, judge_all
from fastmem.report.layers import distinct_layers
from fastmem.run.config import load_run_config
from fastmem.run.metrics import RunRecords
from fastmem.run.predictions import PREDICTIONS_DIR, predictions_path
from fastmem.run.stats import Interval

CALIBRATED = "untrained (BN calibrated)"


@dataclass(frozen=True)
class SeedRun:
    """One trained run of one seed: its final and untrained probes, with intervals, and the paired lift."""

    seed: int
    run_dir: Path
    final_epoch: int
    fit: float | None
    untrained: Mapping[str, Interval]
    final: Mapping[str, Interval]
    lift: Mapping[str, Interval]  # final − untrained, paired over the same queries (empty without predictions)
    queries: int
    calibrated: Mapping[str, Interval]  # the BN-calibrated untrained network (empty where it was not probed)
    calibrated_lift: Mapping[str, Interval]  # final − calibrated untrained, paired
    fit_samples: int  # the samples the last epoch's fit counts (full batches of the subset)


def read_seed_run(seed: int, run_dir: Path) -> SeedRun:
    records = RunRecords.read(run_dir)
    final_epoch = records.final_probe_epoch or 0
    first = records.probes[0] if records.probes else {}
    calibrated_path = Path(run_dir) / PREDICTIONS_DIR / CALIBRATED_FILE
    config = load_run_config(run_dir)
    return SeedRun(seed, Path(run_dir), final_epoch, records.final_fit, accuracy_intervals(records, 0),
                   accuracy_intervals(records, final_epoch), paired_deltas(run_dir, final_epoch, run_dir, 0),
                   int(first.get("probe_queries") or 0), file_intervals(calibrated_path),
                   paired_deltas_of(predictions_path(run_dir, final_epoch), calibrated_path),
                   (config.subset // config.batch_size) * config.batch_size)


@dataclass
class MainJobFigures:
    runs: dict[str, list[SeedRun]]
    layers: list[str] = field(default_factory=list)
    claims: Sequence[Claim] = ()

    @classmethod
    def read(cls, runs: Mapping[str, Sequence[tuple[int, Path]]], claims: Sequence[Claim] = ()) -> MainJobFigures:
        seeded = {label: [read_seed_run(seed, Path(d)) for seed, d in entries] for label, entries in runs.items()}
        first = next(iter(seeded.values()))[0]
        return cls(seeded, list(first.final), claims)

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in next(iter(self.runs.values()))]

    def untrained_runs(self) -> list[SeedRun]:
        """The runs whose epoch-0 probe stands for each seed's untrained network (the first label's)."""
        return next(iter(self.runs.values()))


def summary_payload(figures: MainJobFigures) -> dict[str, Any]:
    """Per layer: untrained, each run's final accuracy and its paired lift; the fits; the claims judged."""
    layers: dict[str, Any] = {}
    names: dict[str, str] = {}
    for layer, shown in distinct_layers(figures.layers):
        row: dict[str, Any] = {"untrained": _entry([(r.seed, r.untrained[layer]) for r in figures.untrained_runs()
                                                    if layer in r.untrained])}
        calibrated = [(r.seed, r.calibrated[layer]) for r in figures.untrained_runs() if layer in r.calibrated]
        if calibrated:
            row[CALIBRATED] = _entry(calibrated)
        for label, runs in figures.runs.items():
            row[label] = _entry([(r.seed, r.final[layer]) for r in runs if layer in r.final])
            lifts = [(r.seed, r.lift[layer]) for r in runs if layer in r.lift]
            if lifts:
                row[f"{label} − untrained"] = _delta_entry(lifts)
            lifts = [(r.seed, r.calibrated_lift[layer]) for r in runs if layer in r.calibrated_lift]
            if lifts:
                row[f"{label} − {CALIBRATED}"] = _delta_entry(lifts)
        layers[layer] = row
        names[layer] = shown
    fits = {label: _entry([(r.seed, Interval(r.fit or 0.0, r.fit or 0.0, r.fit or 0.0)) for r in runs])["accuracy"]
            for label, runs in figures.runs.items()}
    first = figures.untrained_runs()[0]
    return {"seeds": figures.seeds, "epochs": first.final_epoch, "queries": first.queries, "layers": layers,
            "layer_names": names,
            "fit": fits, "claims": judge_claims(figures)}


def judge_claims(figures: MainJobFigures) -> list[dict[str, Any]]:
    """The main job's claims (fastmem/experiments/claims.py's MAIN, passed in by the demo) judged on its runs."""
    views = {label: {r.seed: RunView(r.run_dir, r.seed, r.final_epoch, r.fit, r.fit_samples) for r in runs}
             for label, runs in figures.runs.items()}
    return [{"id": v.claim.id, "verdict": v.verdict, "line": v.line()} for v in judge_all(figures.claims, views)]


def summary_table(payload: Mapping[str, Any]) -> str:
    """Markdown: per layer the untrained net, each run (± half the 95 % interval, or ± the seeds' sd) and its
    paired lift over the untrained net ([95 % interval]); then the fits."""
    first = next(iter(payload["layers"].values()))
    labels = [k for k in first if k not in ("untrained", CALIBRATED) and "−" not in k]
    calibrated = CALIBRATED in first
    head = ["probe point", "untrained"] + ([CALIBRATED] if calibrated else [])
    for label in labels:
        head += [label, f"{label} − untrained"] + ([f"{label} − {CALIBRATED}"] if calibrated else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layer, row in payload["layers"].items():
        cells = [payload.get("layer_names", {}).get(layer, layer), _cell(row.get("untrained"))] + ([_cell(row.get(CALIBRATED))] if calibrated else [])
        for label in labels:
            cells += [_cell(row.get(label)), _cell(row.get(f"{label} − untrained"), signed=True)]
            if calibrated:
                cells.append(_cell(row.get(f"{label} − {CALIBRATED}"), signed=True))
        lines.append("| " + " | ".join(cells) + " |")
    fit_cells = ["*fit of the random labels (last epoch)*", "–"] + (["–"] if calibrated else [])
    for label in labels:
        fit_cells += [f"{100 * payload['fit'][label]:.1f}", ""] + ([""] if calibrated else [])
    lines.append("| " + " | ".join(fit_cells) + " |")
    return "\n".join(lines)


def claims_text(payload: Mapping[str, Any]) -> str:
    """The judge's verdict lines (fastmem/report/judge.py)."""
    return "\n".join(f"- {c['line']}" for c in payload["claims"])
