"""`python -m fastmem.report SWEEP_DIR [--out DIR]`: markdown + PNG plots of one experiment's sweep.

Reads SWEEP_DIR/sweep.json (written by `python -m fastmem.experiments run`) and each run's
metrics.jsonl and config.json; writes report.md beside its figures. Unfinished runs are reported with
what they have so far.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastmem.errors import fail, run_cli
from fastmem.io_utils import atomic_path
from fastmem.report.cells import cell
from fastmem.report.figures import (
    plot_capacity,
    plot_final_per_layer,
    plot_fit_vs_epoch,
    plot_fit_vs_views,
    plot_knn_vs_epoch,
    plot_lift_per_layer,
    plot_tradeoff,
)
from fastmem.report.judge import Claim, RunView, judge_all
from fastmem.report.layers import distinct_layers
from fastmem.report.variants import SweepRun, VariantRuns, group_runs, shared_untrained
from fastmem.run.config import TrainConfig
from fastmem.run.metrics import RunRecords

DEFAULTS = TrainConfig()  # knob values a sweep's base leaves at their default


def load_sweep(sweep_dir: Path) -> tuple[dict[str, Any], list[VariantRuns]]:
    """The sweep's plan and its variants (in plan order), each with its runs (one per seed) and their metrics."""
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
        seed = entry.get("seed", config.get("seed", 0))
        runs.append(SweepRun(RunRecords.read(run_dir).records, label=entry["label"], role=entry.get("role", "run"),
                             value=entry.get("value"), group=entry.get("group", ""), knobs=entry.get("knobs", {}),
                             config=config, seed=int(seed), run_dir=run_dir))
    return plan, group_runs(runs)


def _several_seeds(variants: Sequence[VariantRuns]) -> bool:
    return any(len(v.runs) > 1 for v in variants)


def _epochs(variant: VariantRuns) -> str:
    epochs = variant.epochs
    if not epochs:
        return "0"
    return str(epochs[0]) if min(epochs) == max(epochs) else f"{min(epochs)}–{max(epochs)}"


def _name(variant: VariantRuns) -> str:
    return f"*{variant.label}*" if variant.role == "clean" else variant.label


def _layers(variants: Sequence[VariantRuns]) -> list[tuple[str, str]]:
    return distinct_layers(next((v.layers for v in variants if v.layers), []))


def results_table(variants: Sequence[VariantRuns]) -> str:
    """Per variant: epochs, fit of its labels, agreement with the true labels, final k-NN per probe point (± half the
    95 % interval with one seed, ± sd over several). The untrained rows precede the variants whose untrained network
    they are (one pair when all share it): *untrained, initial BN (epoch 0)*, the run's epoch-0 probe, and *untrained,
    BN calibrated*, the same weights with BatchNorm statistics estimated on the training images."""
    named = _layers(variants)
    layers = [name for name, _ in named]
    seeds = _several_seeds(variants)
    head = "| run | " + ("seeds | " if seeds else "") + "epochs | fit (own labels) | agree (true labels) | "
    lines = [head + " | ".join(shown for _, shown in named) + " |", "|" + "---|" * (4 + seeds + len(layers))]
    shown: tuple[Any, ...] = ()
    for variant in variants:
        signature = variant.untrained_signature
        if signature and signature != shown:
            count = f"{len(variant.probed)} | " if seeds else ""
            lines.append("| *untrained, initial BN (epoch 0)* | " + count + "0 | – | – | "
                         + " | ".join(cell(variant.untrained(n)) for n in layers) + " |")
            if any(variant.calibrated(n) for n in layers):
                lines.append("| *untrained, BN calibrated* | " + count + "0 | – | – | "
                             + " | ".join(cell(variant.calibrated(n)) for n in layers) + " |")
            shown = signature
        lines.append(f"| {_name(variant)} | " + (f"{len(variant.runs)} | " if seeds else "")
                     + f"{_epochs(variant)} | {cell(variant.fit)} | {cell(variant.agree)} | "
                     + " | ".join(cell(variant.final(n)) for n in layers) + " |")
    return "\n".join(lines)


def lift_table(variants: Sequence[VariantRuns], calibrated: bool = False) -> str:
    """Per variant and probe point: final − untrained accuracy of the same run (same queries), in points, with the
    paired bootstrap 95 % interval (one seed) or ± the seeds' sd (several); against the epoch-0 probe (initial BN),
    or with `calibrated` against the BN-calibrated untrained network."""
    named = _layers(variants)
    lines = ["| run | " + " | ".join(shown for _, shown in named) + " |", "|" + "---|" * (1 + len(named))]
    for variant in variants:
        if variant.probed:
            lift = variant.calibrated_lift if calibrated else variant.lift
            lines.append(f"| {_name(variant)} | " + " | ".join(cell(lift(n), signed=True) for n, _ in named) + " |")
    return "\n".join(lines)


def run_views(variants: Sequence[VariantRuns]) -> dict[str, dict[int, RunView]]:
    """What the judge reads of each variant's runs, by label and seed (only runs that trained)."""
    views: dict[str, dict[int, RunView]] = {}
    for variant in variants:
        for run in variant.runs:
            if run.run_dir is None or not run.fits:
                continue
            subset, batch = int(run.config.get("subset") or 0), int(run.config.get("batch_size") or 1)
            last = run.fits[-1]
            seen = (subset // batch) * batch if subset else int(round(last.get("images_per_s", 0) * last.get("seconds", 0)))
            views.setdefault(variant.label, {})[run.seed] = RunView(run.run_dir, run.seed, run.final_probe_epoch,
                                                                   run.final_fit, seen)
    return views


def verdicts_text(plan: Mapping[str, Any], variants: Sequence[VariantRuns]) -> str:
    """One line per claim of the plan: the judge's verdict with its numbers (fastmem/report/judge.py)."""
    claims = [Claim.from_dict(c) for c in plan.get("claims", [])]
    if not claims:
        return "No claims are declared for this experiment."
    views = run_views(variants)
    return "\n".join(f"- {verdict.line()}" for verdict in judge_all(claims, views))


def _knobs_table(plan: dict[str, Any], several_seeds: bool) -> str:
    lines = ["| run | " + ("seed | " if several_seeds else "") + "knobs | run directory |",
             "|---|" + ("---|" if several_seeds else "") + "---|---|"]
    for entry in plan["runs"]:
        knobs = ", ".join(f"{k}={v}" for k, v in entry.get("knobs", {}).items()) or "(scale base)"
        if entry.get("init_from"):
            knobs += f", starts from the final checkpoint of “{entry['init_from']}”"
        seed = f"{entry.get('seed', 0)} | " if several_seeds else ""
        lines.append(f"| {entry['label']} | {seed}{knobs} | `{entry['run_dir']}` |")
    return "\n".join(lines)


def _queries(variants: Sequence[VariantRuns]) -> int:
    return next((int(r["probe_queries"]) for v in variants for run in v.runs for r in run.probes
                 if r.get("probe_queries")), 0)


def _reference_text(base: Mapping[str, Any]) -> str:
    reference = int(base.get("probe_reference") or 0)
    if reference > 0:
        return (f"reference = the first {reference} training images of the data seed's order (fixed across N), "
                "with their true labels")
    return "reference = the training images with their true labels"


def _statistics_text(variants: Sequence[VariantRuns]) -> str:
    queries = _queries(variants)
    if _several_seeds(variants):
        seeds = sorted({s for v in variants for s in v.seeds})
        text = (f"Each figure is the mean over seeds {', '.join(map(str, seeds))} ± the seeds' sample standard "
                "deviation (sd); the figures draw each seed's point.")
    elif queries:
        text = (f"Each accuracy carries ± half its 95 % Wilson interval over the {queries} test queries; each lift its paired bootstrap "
                "95 % interval [low, high] over the same queries.")
    else:
        text = ("These runs recorded no query counts or predictions (an older format): their accuracies are bare values, "
                "without intervals.")
    return text


def _lift_text(variants: Sequence[VariantRuns]) -> str:
    runs = [run for v in variants for run in v.probed if run.untrained and run.final_probe_epoch]
    text = "Final k-NN accuracy minus the same run's epoch-0 probe (its own untrained network, the same queries)"
    if _several_seeds(variants):
        text += ": the mean over seeds ± the seeds' sd."
    elif any(run.lifts for run in runs):
        text += ": [the paired bootstrap 95 % interval]; an interval that contains 0 is no finding."
    else:
        text += "."
    if any(not run.lifts for run in runs):
        text += " Bare values: runs that kept no per-query predictions (no paired interval)."
    return text


def write_report(sweep_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render report.md and its PNGs for the sweep in `sweep_dir`; returns the markdown path."""
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out is not None else sweep_dir / "report"
    plan, variants = load_sweep(sweep_dir)
    if not any(v.records for v in variants):
        fail(f"{sweep_dir}: no run has metrics yet; nothing to report")
    exp, scale = plan["experiment"], plan["scale"]
    base = next((v.config for v in variants if v.config), {})
    setting = (f"{base.get('dataset')} ({base.get('subset') or 'all'} training images, {base.get('probe_subset') or 'all'} "
               f"test queries), {base.get('model')} width {base.get('width')}, projector B={base.get('bottleneck_dim')}, "
               f"{base.get('loss')} loss, {base.get('optimizer')} lr {base.get('lr')}, batch {base.get('batch_size')}")
    name = f"{exp}: {plan['title']}"
    layers = next((v.layers for v in variants if v.layers), [])
    late = [n for n in ("h", "z") if n in layers]
    figures = [
        ("Final k-NN accuracy per probe point", plot_final_per_layer(variants, out / "final_per_layer.png", f"{name}: final k-NN per layer")),
        ("Lift over the untrained network, per probe point", plot_lift_per_layer(variants, out / "lift_per_layer.png", f"{name}: final − untrained k-NN")),
        ("k-NN accuracy over training, per probe point", plot_knn_vs_epoch(variants, out / "knn_vs_epoch.png", f"{name}: k-NN over training")),
        ("Fit of the training labels over training", plot_fit_vs_epoch(variants, out / "fit_vs_epoch.png", f"{name}: label fit")),
    ]
    if "tradeoff" in plan["plots"]:
        figures.append(("Memorization vs generalization", plot_tradeoff(variants, out / "tradeoff.png", f"{name}: fit vs k-NN", late)))
    if "fit_vs_views" in plan["plots"]:
        figures.append(("Fit against the number of labelled views", plot_fit_vs_views(variants, out / "fit_vs_views.png", f"{name}: capacity")))
    if "capacity" in plan["plots"]:
        figures.append(("Capacity axes", plot_capacity(variants, out / "capacity.png", f"{name}: fit and k-NN per axis", late)))
    untrained = ("The *untrained, initial BN (epoch 0)* row is the epoch-0 probe of every run's network (they all "
                 "start from it)" if shared_untrained(variants) else
                 "Each *untrained, initial BN (epoch 0)* row is the epoch-0 probe of the runs below it, up to the next "
                 "such row (their untrained networks differ)")
    untrained += ("; *untrained, BN calibrated* is the same network with its BatchNorm statistics re-estimated on the "
                  "training images (no weight changes: fastmem/probe/calibrated.py), the baseline of a trained "
                  "network's accumulated statistics")
    text = [
        f"# Experiment {name} (scale `{scale}`)", "",
        f"**Varies:** {plan['varies']}.  ", f"**Expected (PROTOCOL.md):** {plan['expectation']}.  ",
        f"**Setting:** {setting}; k-NN k={base.get('probe_k', DEFAULTS.probe_k)}, {base.get('probe_vote', DEFAULTS.probe_vote)} vote, cosine, "
        f"{_reference_text(base)}.", "",
        *([f"**Note:** {plan['note']}", ""] if plan.get("note") else []),
        "## Results (accuracy in %)", "", results_table(variants), "",
        f"{_statistics_text(variants)} {untrained}. Clean-label reference runs are in *italics*; “fit” is the training "
        "accuracy on the run's own (random) labels over the last epoch, “agree” how often the prediction equals the true "
        "label.", "",
        "## Verdicts", "", verdicts_text(plan, variants), "",
        "Computed from the records above by fastmem/report/judge.py (the claims: fastmem/experiments/claims.py, "
        "copied into sweep.json): *holds* / *does not hold* when every seed's 95 % interval and the seeds' t-interval "
        "lie beyond the threshold on one side, *inconclusive* when one reaches it or seeds are missing, *not in regime* "
        "when a precondition of the claim fails.", "",
        "## Lift over the untrained network, BN calibrated (points)", "", lift_table(variants, calibrated=True), "",
        "## Lift over the untrained network, initial BN (points)", "", lift_table(variants), "",
        _lift_text(variants), "",
        *[line for caption, path in figures for line in (f"## {caption}", "", f"![{caption}]({path.name})", "")],
        "## Runs", "", _knobs_table(plan, _several_seeds(variants)), "",
        f"Reproduce: `python -m fastmem.experiments run {exp} --scale {scale}`"
        + (f" --dataset {base.get('dataset')}" if base.get("dataset") not in (None, "fashion-mnist") else "")
        + (f" --seeds {plan['seeds']}" if int(plan.get("seeds") or 1) > 1 else "") + "",
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
    text = report.read_text()
    for section in ("## Results (accuracy in %)", "## Verdicts"):
        print(section)
        print(text.split(section)[1].split("\n## ")[0].strip())
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
