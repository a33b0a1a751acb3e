"""`python -m fastmem.experiments list | show X | run X`: the experiments of PROTOCOL.md (and the main job), one command each."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from fastmem.errors import run_cli
from fastmem.experiments.specs import EXPERIMENTS, MAIN_JOB, SCALE_BASE, SCALES, Experiment
from fastmem.experiments.sweep import (
    PlannedRun,
    get_experiment,
    hold_sweep_lock,
    parse_overrides,
    plan_experiment,
    run_plan,
    summary_table,
    train_command,
    validate_plan,
    write_plan,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastmem.experiments",
                                     description="Experiments A–K of the benign-memorization protocol.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the experiments, what they vary, and their runs per scale")
    for name, help_text in (("show", "the runs of one experiment and the trainer commands it would start"),
                            ("run", "run (or continue) one experiment, then write its report")):
        sub = commands.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.add_argument("experiments", nargs="+", metavar="ID",
                         help=f"experiment id(s): {', '.join(EXPERIMENTS)}, or all (runs shared between them train "
                              f"once); {MAIN_JOB.id.lower()}: the main job (python -m fastmem.demo)")
        sub.add_argument("--scale", default="cpu", choices=SCALES, help="smoke (seconds), cpu (2 cores), paper (GPU)")
        sub.add_argument("--dataset", default=None, help="dataset instead of the scale's default")
        sub.add_argument("--data-dir", default=None, help="where the dataset files are")
        sub.add_argument("--out", default="runs/experiments", help="output folder (runs/ and one folder per experiment)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KNOB=VALUE",
                         help="override a trainer knob for every run (repeatable), e.g. --set epochs=50")
        sub.add_argument("--jobs", type=int, default=0,
                         help="runs side by side on a CPU, each with cores/jobs threads (0 = one per core); on several GPUs, one run per GPU")
        sub.add_argument("--no-report", action="store_true", help="skip the report after the runs")
        sub.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                         help="a progress bar per running run (default: when stderr is a terminal)")
    return parser


def list_experiments() -> None:
    """Print every spec with its run counts per scale, then the scales' base knobs."""
    print(f"{'id':<4} {'experiment':<40} {'runs (smoke/cpu/paper)':<23} varies")
    for experiment in [*EXPERIMENTS.values(), MAIN_JOB]:
        counts = []
        for scale in SCALES:
            counts.append(str(len({tuple(sorted(v.knobs.items())) + (v.init_from,) for v in experiment.variants(scale)})))
        print(f"{experiment.id:<4} {experiment.title:<40} {'/'.join(counts):<23} {experiment.varies}")
        print(f"{'':<4} expected: {experiment.expectation}")
        if experiment.knobs:
            print(f"{'':<4} knobs of every run: " + ", ".join(f"{k}={v}" for k, v in experiment.knobs.items()))
    print("\nscale base knobs:")
    for scale, knobs in SCALE_BASE.items():
        print(f"  {scale}: " + ", ".join(f"{k}={v}" for k, v in knobs.items()))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        list_experiments()
        return 0
    ids = list(EXPERIMENTS) if [i.lower() for i in args.experiments] == ["all"] else args.experiments
    experiments = [get_experiment(i) for i in dict.fromkeys(i.upper() for i in ids)]
    overrides = parse_overrides(args.overrides)
    for name in ("dataset", "data_dir"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    out = Path(args.out)
    plans = {e.id: plan_experiment(e, args.scale, out, overrides) for e in experiments}
    runs = [run for plan in plans.values() for run in plan]
    validate_plan(runs)  # every run of every experiment, before any starts
    if args.command == "show":
        for experiment in experiments:
            print(f"experiment {experiment.id}: {experiment.title}")
            for run in plans[experiment.id]:
                state = "finished" if run.finished else ("interrupted" if (run.run_dir / "config.json").exists() else "new")
                print(f"  {run.variant.label} [{state}]\n    {' '.join(train_command(run, run.config.threads))}")
        return 0
    with hold_sweep_lock(out):  # one sweep runner per output folder
        return run_experiments(args, out, experiments, plans, runs)


def run_experiments(args: argparse.Namespace, out: Path, experiments: Sequence[Experiment],
                    plans: Mapping[str, Sequence[PlannedRun]], runs: Sequence[PlannedRun]) -> int:
    """Write the plans, train what is missing, print the summary and write the reports."""
    import torch

    gpus = torch.cuda.device_count() if any(r.config.device != "cpu" for r in runs) else 0
    sweep_dirs = [write_plan(e, args.scale, out, plans[e.id]) for e in experiments]
    started = time.perf_counter()
    print(f"experiments {', '.join(plans)} at scale {args.scale}: {len({r.run_dir for r in runs})} runs in {out / 'runs'}",
          flush=True)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    rows = run_plan(runs, jobs=args.jobs, gpus=gpus, progress=progress)
    print(f"\n{summary_table(rows)}\n\ntook {(time.perf_counter() - started) / 60:.1f} min")
    if not args.no_report:
        from fastmem.report.render import write_report

        for sweep_dir in sweep_dirs:
            print(f"report: {write_report(sweep_dir, sweep_dir / 'report')}")
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
