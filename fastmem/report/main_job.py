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
from fastmem.report.intervals import accuracy_intervals, paired_deltas
from fastmem.run.metrics import RunRecords
from fastmem.run.stats import Interval

FULL, NONE = "full augmentation", "no augmentation"
# PROTOCOL's benign-lift bar for the main job: points above the untrained network, paired interval above 0.
LIFT_POINTS = 2.0
LIFT_LAYERS = ("stage2", "stage3")
FIT_MIN, Z_MAX = 0.99, 0.15


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


def read_seed_run(seed: int, run_dir: Path) -> SeedRun:
    records = RunRecords.read(run_dir)
    final_epoch = records.final_probe_epoch or 0
    first = records.probes[0] if records.probes else {}
    return SeedRun(seed, Path(run_dir), final_epoch, records.final_fit, accuracy_intervals(records, 0),
                   accuracy_intervals(records, final_epoch), paired_deltas(run_dir, final_epoch, run_dir, 0),
                   int(first.get("probe_queries") or 0))


@dataclass
class MainJobFigures:
    runs: dict[str, list[SeedRun]]
    layers: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, runs: Mapping[str, Sequence[tuple[int, Path]]]) -> MainJobFigures:
        seeded = {label: [read_seed_run(seed, Path(d)) for seed, d in entries] for label, entries in runs.items()}
        first = next(iter(seeded.values()))[0]
        return cls(seeded, list(first.final))

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in next(iter(self.runs.values()))]

    def untrained_runs(self) -> list[SeedRun]:
        """The runs whose epoch-0 probe stands for each seed's untrained network (the first label's)."""
        return next(iter(self.runs.values()))


def summary_payload(figures: MainJobFigures) -> dict[str, Any]:
    """Per layer: untrained, each run's final accuracy and its paired lift; the fits; the claims judged."""
    layers: dict[str, Any] = {}
    for layer in figures.layers:
        row: dict[str, Any] = {"untrained": _entry([(r.seed, r.untrained[layer]) for r in figures.untrained_runs()
                                                    if layer in r.untrained])}
        for label, runs in figures.runs.items():
            row[label] = _entry([(r.seed, r.final[layer]) for r in runs if layer in r.final])
            lifts = [(r.seed, r.lift[layer]) for r in runs if layer in r.lift]
            if lifts:
                row[f"{label} − untrained"] = _delta_entry(lifts)
        layers[layer] = row
    fits = {label: _entry([(r.seed, Interval(r.fit or 0.0, r.fit or 0.0, r.fit or 0.0)) for r in runs])["accuracy"]
            for label, runs in figures.runs.items()}
    first = figures.untrained_runs()[0]
    return {"seeds": figures.seeds, "epochs": first.final_epoch, "queries": first.queries, "layers": layers,
            "fit": fits, "claims": judge_claims(figures)}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def judge_claims(figures: MainJobFigures) -> list[dict[str, Any]]:
    """Experiment A's claims at this scale, each with whether it holds and the figures it rests on."""
    claims: list[dict[str, Any]] = []
    if FULL in figures.runs:
        runs = figures.runs[FULL]

        def lift_holds(layer: str) -> tuple[bool, str]:
            lifts = [r.lift[layer] for r in runs if layer in r.lift]
            if not lifts:
                return False, f"{layer}: no paired figures"
            mean = 100 * _mean([i.estimate for i in lifts])
            holds = mean >= LIFT_POINTS and all(i.low > 0 for i in lifts)
            spans = ", ".join(f"[{100 * i.low:+.1f}, {100 * i.high:+.1f}]" for i in lifts)
            return holds, f"{layer} {mean:+.1f} points (paired 95 % {spans})"

        h_holds, h_text = lift_holds("h")
        mids = [lift_holds(layer) for layer in LIFT_LAYERS if layer in figures.layers]
        mid_holds = any(ok for ok, _ in mids)
        claims.append({
            "claim": f"benign: with full augmentation h and stage2 or stage3 end ≥ {LIFT_POINTS:g} points above the "
                     "untrained network, the paired interval above 0",
            "holds": h_holds and mid_holds, "figures": "; ".join([h_text, *(t for _, t in mids)])})
    if NONE in figures.runs:
        runs = figures.runs[NONE]
        fit = _mean([r.fit or 0.0 for r in runs])
        z = _mean([r.final["z"].estimate for r in runs if "z" in r.final]) if "z" in figures.layers else float("nan")
        h_lifts = [r.lift["h"] for r in runs if "h" in r.lift]
        h_below = bool(h_lifts) and all(i.high < 0 for i in h_lifts)
        claims.append({
            "claim": f"malign: without augmentation the random labels are fit (≥ {100 * FIT_MIN:g} %), z collapses "
                     f"(≤ {100 * Z_MAX:g} %) and h ends below the untrained network",
            "holds": fit >= FIT_MIN and z <= Z_MAX and h_below,
            "figures": f"fit {100 * fit:.1f} %, z {100 * z:.1f} %, h "
                       + (", ".join(f"{100 * i.estimate:+.1f} [{100 * i.low:+.1f}, {100 * i.high:+.1f}]" for i in h_lifts)
                          or "no paired figures")})
    return claims


def summary_table(payload: Mapping[str, Any]) -> str:
    """Markdown: per layer the untrained net, each run (± half the 95 % interval, or ± the seeds' sd) and its
    paired lift over the untrained net ([95 % interval]); then the fits."""
    labels = [k for k in next(iter(payload["layers"].values())) if k != "untrained" and "−" not in k]
    head = ["probe point", "untrained"]
    for label in labels:
        head += [label, f"{label} − untrained"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layer, row in payload["layers"].items():
        cells = [layer, _cell(row.get("untrained"))]
        for label in labels:
            cells += [_cell(row.get(label)), _cell(row.get(f"{label} − untrained"), signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    fit_cells = ["*fit of the random labels (last epoch)*", "–"]
    for label in labels:
        fit_cells += [f"{100 * payload['fit'][label]:.1f}", ""]
    lines.append("| " + " | ".join(fit_cells) + " |")
    return "\n".join(lines)


def claims_text(payload: Mapping[str, Any]) -> str:
    return "\n".join(f"- {'holds' if c['holds'] else 'does not hold'}: {c['claim']} — {c['figures']}"
                     for c in payload["claims"])
