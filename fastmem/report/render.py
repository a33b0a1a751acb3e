"""`python -m fastmem.report SWEEP_DIR [--out DIR]`: markdown + PNG plots of one experiment's sweep.

Reads SWEEP_DIR/sweep.json (written by `python -m fastmem.experiments run`) and each run's
metrics.jsonl and config.json; writes report.md beside its figures. Unfinished runs are reported with
what they have so far.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastmem.errors import fail, run_cli
from fastmem.io_utils import atomic_path
from fastmem.report.figures import (
    SweepRun,
    plot_capacity,
    plot_final_per_layer,
    plot_fit_vs_epoch,
    plot_fit_vs_views,
    plot_knn_vs_epoch,
    plot_tradeoff,
)
from fastmem.run.config import TrainConfig
from fastmem.run.metrics import RunRecords

DEFAULTS = TrainConfig()  # knob values a sweep's base leaves at their default


def load_sweep(sweep_dir: Path) -> tuple[dict[str, Any], list[SweepRun]]:
    """The sweep's plan and its runs with their metrics (one SweepRun per variant, in plan order)."""
    plan_path = sweep_dir / "sweep.json"
    if not plan_path.is_file():
        fail(f"{sweep_dir}: not a sweep folder (no sweep.json; run python -m fastmem.experiments run first)")
    try:
        plan = json.loads(plan_path.read_text())
        entries = plan["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        fail(f"{plan_path}: unreadable sweep plan ({err})")
    runs = []
    for entry in entries:
        run_dir = sweep_dir / entry["run_dir"]
        config_path = run_dir / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        runs.append(SweepRun(RunRecords.read(run_dir).records, label=entry["label"], role=entry.get("role", "run"),
                             value=entry.get("value"), group=entry.get("group", ""), knobs=entry.get("knobs", {}),
                             config=config))
    return plan, runs


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def results_table(runs: Sequence[SweepRun]) -> str:
    """Per run: epochs, fit of its labels, agreement with the true labels, final k-NN per probe point."""
    layers = next((r.layers for r in runs if r.layers), [])
    head = "| run | epochs | fit (own labels) | agree (true labels) | " + " | ".join(layers) + " |"
    lines = [head, "|" + "---|" * (4 + len(layers))]
    reference = next((r for r in runs if r.untrained), None)
    if reference is not None:
        lines.append("| *untrained (epoch 0)* | 0 | – | – | "
                     + " | ".join(_pct(reference.untrained_knn(n)) for n in layers) + " |")
    for run in runs:
        fits = run.fits
        epochs = fits[-1]["epoch"] if fits else 0
        name = f"*{run.label}*" if run.role == "clean" else run.label
        lines.append(f"| {name} | {epochs} | {_pct(run.final_fit)} | {_pct(run.final_agree)} | "
                     + " | ".join(_pct(run.final_knn(n)) for n in layers) + " |")
    return "\n".join(lines)


def _knobs_table(runs: Sequence[SweepRun], plan: dict[str, Any], sweep_dir: Path) -> str:
    lines = ["| run | knobs | run directory |", "|---|---|---|"]
    for run, entry in zip(runs, plan["runs"]):
        knobs = ", ".join(f"{k}={v}" for k, v in run.knobs.items()) or "(scale base)"
        if entry.get("init_from"):
            knobs += f", starts from the final checkpoint of “{entry['init_from']}”"
        lines.append(f"| {run.label} | {knobs} | `{entry['run_dir']}` |")
    return "\n".join(lines)


def write_report(sweep_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render report.md and its PNGs for the sweep in `sweep_dir`; returns the markdown path."""
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out is not None else sweep_dir / "report"
    plan, runs = load_sweep(sweep_dir)
    if not any(r.records for r in runs):
        fail(f"{sweep_dir}: no run has metrics yet; nothing to report")
    exp, scale = plan["experiment"], plan["scale"]
    base = next((r.config for r in runs if r.config), {})
    setting = (f"{base.get('dataset')} ({base.get('subset') or 'all'} training images, {base.get('probe_subset') or 'all'} "
               f"test queries), {base.get('model')} width {base.get('width')}, projector B={base.get('bottleneck_dim')}, "
               f"{base.get('loss')} loss, {base.get('optimizer')} lr {base.get('lr')}, batch {base.get('batch_size')}")
    name = f"{exp}: {plan['title']}"
    layers = next((r.layers for r in runs if r.layers), [])
    late = [n for n in ("h", "z") if n in layers]
    figures = [
        ("Final k-NN accuracy per probe point", plot_final_per_layer(runs, out / "final_per_layer.png", f"{name}: final k-NN per layer")),
        ("k-NN accuracy over training, per probe point", plot_knn_vs_epoch(runs, out / "knn_vs_epoch.png", f"{name}: k-NN over training")),
        ("Fit of the training labels over training", plot_fit_vs_epoch(runs, out / "fit_vs_epoch.png", f"{name}: label fit")),
    ]
    if "tradeoff" in plan["plots"]:
        figures.append(("Memorization vs generalization", plot_tradeoff(runs, out / "tradeoff.png", f"{name}: fit vs k-NN", late)))
    if "fit_vs_views" in plan["plots"]:
        figures.append(("Fit against the number of labelled views", plot_fit_vs_views(runs, out / "fit_vs_views.png", f"{name}: capacity")))
    if "capacity" in plan["plots"]:
        figures.append(("Capacity axes", plot_capacity(runs, out / "capacity.png", f"{name}: fit and k-NN per axis", late)))
    text = [
        f"# Experiment {name} (scale `{scale}`)", "",
        f"**Varies:** {plan['varies']}.  ", f"**Expected (PROTOCOL.md):** {plan['expectation']}.  ",
        f"**Setting:** {setting}; k-NN k={base.get('probe_k', DEFAULTS.probe_k)}, {base.get('probe_vote', DEFAULTS.probe_vote)} vote, cosine, "
        "reference = the training images with their true labels.", "",
        *([f"**Note:** {plan['note']}", ""] if plan.get("note") else []),
        "## Results (accuracy in %)", "", results_table(runs), "",
        "Clean-label reference runs are in *italics*; “fit” is the training accuracy on the run's own (random) labels "
        "over the last epoch, “agree” how often the prediction equals the true label.", "",
        *[line for caption, path in figures for line in (f"## {caption}", "", f"![{caption}]({path.name})", "")],
        "## Runs", "", _knobs_table(runs, plan, sweep_dir), "",
        f"Reproduce: `python -m fastmem.experiments run {exp} --scale {scale}`"
        + (f" --dataset {base.get('dataset')}" if base.get("dataset") not in (None, "fashion-mnist") else "") + "",
    ]
    report = out / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text("\n".join(text) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmem.report",
                                     description="Markdown + PNG report of one experiment's sweep.")
    parser.add_argument("sweep_dir", help="the experiment folder (holds sweep.json), e.g. runs/experiments/A")
    parser.add_argument("--out", default=None, help="where report.md and the PNGs go (default SWEEP_DIR/report)")
    args = parser.parse_args(argv)
    report = write_report(args.sweep_dir, args.out)
    print(f"report: {report}")
    print(report.read_text().split("## Results (accuracy in %)")[1].split("\n## ")[0].strip())
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
