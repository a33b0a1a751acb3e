"""The main job (`make demo`, `python -m fastmem.demo`): benign versus malign memorization on a CPU.

The spec MAIN_JOB (fastmem/experiments/specs.py) at the `cpu` scale, run by the sweep runner like every
experiment: the small CNN on entirely random labels, with the paper's full augmentation and with none,
every layer probed with k-NN against the true labels (untrained, during and after training). Prints a
per-layer table and writes a PNG plot and a markdown summary. The runs are sweep run directories,
OUT/runs/<knobs>-<digest>/, named by their identity (the sweep's RUN_FORMAT and resolved config):
finished runs of the same arguments are reused, interrupted ones resumed, and other arguments train
their own runs beside the earlier ones (as a sweep tool keyed by config does; going back to the earlier
arguments reuses theirs); the plot and summary describe the latest invocation.
`python -m fastmem.experiments run main --scale cpu --out OUT` maps to the same directories.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastmem.cpu_precision import cpu_precision_choice
from fastmem.errors import fail, run_cli
from fastmem.experiments.baselines import ensure_calibrated_baselines
from fastmem.experiments.claims import claims_for
from fastmem.experiments.specs import MAIN_JOB, SCALE_BASE
from fastmem.experiments.sweep import PlannedRun, hold_sweep_lock, plan_experiment, run_plan, validate_plan
from fastmem.io_utils import atomic_path, write_json_atomic
from fastmem.report.demo_plots import plot_benign_vs_malign
from fastmem.report.main_job import MainJobFigures, claims_text, summary_payload, summary_table
from fastmem.run.metrics import RunRecords
from fastmem.runtime import cpu_name, describe_machine

SCALE = "cpu"
# What the main job trains unless a flag says otherwise: the scale's base knobs under the spec's own.
DEFAULTS: dict[str, Any] = {**SCALE_BASE[SCALE], **MAIN_JOB.knobs}
# The flags that set a trainer knob of every run (--seed sets both the label and the training seed).
KNOB_FLAGS = ("dataset", "data_dir", "subset", "probe_subset", "epochs", "probe_every", "width", "bottleneck_dim",
              "batch_size", "seed")


def _resolved_precision(run_dir: Path) -> dict[str, str]:
    """What `--precision auto` chose for the run, and why (config.json's `resolved`)."""
    resolved = json.loads((run_dir / "config.json").read_text()).get("resolved", {})
    return {k: resolved[k] for k in ("precision", "precision_reason") if k in resolved}


def planned_precision_reason(run: PlannedRun) -> str:
    """The precision the runs will train in and why, before any of them starts (one decision for all)."""
    config = run.config
    if config.precision == "auto" and config.device == "cpu":
        return cpu_precision_choice().reason
    return f"{config.precision}: as requested"


def build_parser() -> argparse.ArgumentParser:
    """The demo's flags, with the main job's knobs as defaults."""
    parser = argparse.ArgumentParser(
        prog="python -m fastmem.demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Random labels with and without augmentation on Fashion-MNIST; per-layer k-NN table and plot.",
        epilog="Runs are kept in OUT/runs/<knobs>-<digest>, the digest naming fastmem's run format and every knob "
               "that changes results: running again with the same arguments reuses the finished runs (resumes cut "
               "ones); other arguments train new runs beside them, and the plot and summary then describe the "
               "new ones. Remove OUT/runs/... to retrain a run from scratch.",
    )
    add = parser.add_argument
    add("--out", default="demo_out", help="output directory (runs/, plot, summary)")
    add("--dataset", default=DEFAULTS["dataset"], help="dataset (see python -m fastmem.train --help)")
    add("--data-dir", default=None, help="where the dataset files are")
    add("--subset", type=int, default=DEFAULTS["subset"], help="training images (a seeded random subset)")
    add("--probe-subset", type=int, default=DEFAULTS["probe_subset"], help="test images used as k-NN queries")
    add("--epochs", type=int, default=DEFAULTS["epochs"], help="epochs per run")
    add("--probe-every", type=int, default=DEFAULTS["probe_every"], help="k-NN probe every E epochs")
    add("--width", type=float, default=DEFAULTS["width"], help="width multiplier of the encoder")
    add("--bottleneck-dim", type=int, default=DEFAULTS["bottleneck_dim"], help="projector width B")
    add("--batch-size", type=int, default=DEFAULTS["batch_size"], help="batch size")
    add("--seed", type=int, default=DEFAULTS["seed"], help="seed of labels, initialisation and augmentation")
    add("--seeds", type=int, default=1,
        help="run every variant for seeds 0…S-1 (labels, initialisation, augmentation; the data seed stays): the "
             "table then gives the mean ± the seeds' standard deviation; S > 1 overrides --seed")
    add("--sequential", action="store_true",
        help="run the two trainings one after the other with all threads (default: side by side, one core each)")
    return parser


def demo_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The knobs the flags change from DEFAULTS (what `--set` would be for `python -m fastmem.experiments`)."""
    given = {name: getattr(args, name) for name in KNOB_FLAGS}
    given["label_seed"] = args.seed
    return {name: value for name, value in given.items() if value is not None and value != DEFAULTS.get(name)}


def plan_main_job(args: argparse.Namespace) -> list[PlannedRun]:
    """The main job's runs under OUT/runs, as the sweep runner plans them."""
    return plan_experiment(MAIN_JOB, SCALE, Path(args.out), demo_overrides(args), seeds=args.seeds)


def earlier_runs(out: Path, runs: Sequence[PlannedRun]) -> list[str]:
    """The run directories OUT/summary.json names that this invocation does not plan (an earlier one's arguments)."""
    try:
        summary = json.loads((out / "summary.json").read_text())
        named = [Path(d).name for d in summary["runs"].values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []  # no earlier summary (or not one of ours): nothing to say
    planned = {run.run_dir.name for run in runs}
    return [name for name in named if name not in planned]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.epochs < 1 or 0 < args.subset < args.batch_size:
        fail("--epochs must be >= 1 and --subset at least one batch")
    out = Path(args.out)
    runs = plan_main_job(args)
    validate_plan(runs)  # bad knobs or missing data fail here, before anything is written
    started = time.perf_counter()
    print(f"main job ({MAIN_JOB.id} at scale {SCALE}): {len(runs)} runs in {out / 'runs'}", flush=True)
    print(f"precision: {planned_precision_reason(runs[0])}", flush=True)
    with hold_sweep_lock(out):  # one main job per output folder at a time
        earlier = earlier_runs(out, runs)
        if earlier:
            print(f"note: {out / 'summary.json'} describes other arguments ({', '.join(earlier)}); they are kept, "
                  f"these arguments train their own runs", flush=True)
        run_plan(runs, jobs=1 if args.sequential else len(runs), gpus=0, threads=None if args.sequential else 1,
                 progress=True)
    grouped: dict[str, list[tuple[int, Path]]] = {}
    for run in runs:
        grouped.setdefault(run.variant.label, []).append((run.seed, run.run_dir))
    ensure_calibrated_baselines([run.run_dir for run in runs])  # the second untrained baseline (BN calibrated)
    payload = summary_payload(MainJobFigures.read(grouped, claims_for(MAIN_JOB.id, SCALE)))
    table = summary_table(payload)
    claims = claims_text(payload)
    first_seed = {label: RunRecords.read(entries[0][1]) for label, entries in grouped.items()}
    plot = plot_benign_vs_malign(first_seed, out / "benign_vs_malign.png",
                                 f"Random labels on {args.dataset} ({args.subset} images): k-NN on the true labels "
                                 f"per layer, 95 % intervals", payload=payload)
    wall = time.perf_counter() - started
    config = runs[0].config
    precision = _resolved_precision(runs[0].run_dir)
    seeds = f"seeds {', '.join(map(str, payload['seeds']))}: mean ± the seeds' standard deviation" \
        if len(payload["seeds"]) > 1 else "± half the 95 % Wilson interval over the queries"
    summary = (f"# Benign vs malign memorization ({args.dataset}, {args.subset} images, random labels)\n\n"
               f"{config.model} (width {config.width:g}, B = {config.bottleneck_dim}), {payload['epochs']} epochs, "
               f"{precision.get('precision', config.precision)} on {cpu_name()}. "
               f"k-NN (k={config.probe_k}, cosine, {config.probe_vote} vote) accuracy in % on "
               f"{payload['queries']} test images, reference = the training images with their true labels; "
               f"{seeds}; the lift over each seed's untrained network is paired over the same queries "
               f"([95 % paired bootstrap interval]).\n\n{table}\n\n{claims}\n\n![plot]({plot.name})\n")
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(summary)
    write_json_atomic(out / "summary.json", {
        "experiment": MAIN_JOB.id, "scale": SCALE, "overrides": demo_overrides(args),
        "runs": {run.variant.label + (f" (seed {run.seed})" if args.seeds > 1 else ""): str(run.run_dir)
                 for run in runs},
        **payload, "wall_seconds": round(wall, 1), "machine": describe_machine(),
        "precision": precision,
    }, sort_keys=False)
    print("\n" + table + "\n\n" + claims + f"\n\nplot: {plot}\nsummary: {out / 'summary.md'}  "
          f"(this invocation took {wall / 60:.1f} min)")
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)


if __name__ == "__main__":
    cli()
