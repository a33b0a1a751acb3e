"""`python -m fastmem.experiments list | show X | run X | status OUT`: the experiments of PROTOCOL.md (and the main job).

`run` trains here (`--executor inline`, the default) or submits through submitit (`local`, `slurm`:
fastmem/experiments/cluster/); `status` shows where every run of a sweep stands.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from fastmem.errors import fail, run_cli
from fastmem.experiments.cluster.options import ClusterOptions, add_cluster_arguments, options_from_args
from fastmem.experiments.specs import EXPERIMENTS, MAIN_JOB, SCALE_BASE, SCALE_NOTES, SCALES, Experiment
from fastmem.experiments.sweep import (
    SEED_KNOBS,
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
        sub.add_argument("--seeds", type=int, default=1, metavar="S",
                         help="every run for seeds 0…S-1 (seed and label_seed; S = 1: the spec's seeds, as --set gives)")
        sub.add_argument("--only", default="", metavar="LABELS",
                         help="only the variants whose label contains one of these comma-separated texts (and the "
                              "runs they start from), e.g. --only 'n=10,n=20' (default: every variant)")
        sub.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                         help="progress bars (default: when stderr is a terminal)")
        if name == "run":
            add_cluster_arguments(sub)
    export = commands.add_parser("export", help="copy the evidence of finished runs (configs, metrics, kept "
                                               "predictions, baselines) and each experiment's plan into a folder to "
                                               "commit, and render its report from that copy")
    export.add_argument("out", metavar="OUT", help="the sweep's output folder (run's --out)")
    export.add_argument("dest", metavar="DEST", help="where the evidence goes, e.g. results/fashion-mnist-cpu")
    export.add_argument("experiments", nargs="*", metavar="ID", help="experiment id(s) (default: every one in OUT)")
    status = commands.add_parser("status", help="where every run of a sweep stands: state, job, requeues, last "
                                                "metrics and log")
    status.add_argument("out", metavar="OUT", help="the sweep's output folder (run's --out)")
    status.add_argument("experiments", nargs="*", metavar="ID", help="experiment id(s) (default: every one in OUT)")
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
    if args.command == "export":
        return export_evidence(Path(args.out), Path(args.dest), args.experiments)
    if args.command == "status":
        from fastmem.experiments.cluster.status import status_report

        print(status_report(Path(args.out), args.experiments))
        return 0
    ids = list(EXPERIMENTS) if [i.lower() for i in args.experiments] == ["all"] else args.experiments
    experiments = [get_experiment(i) for i in dict.fromkeys(i.upper() for i in ids)]
    overrides = parse_overrides(args.overrides)
    if args.seeds > 1 and set(overrides) & set(SEED_KNOBS):
        given = ", ".join(f"--set {k}={overrides[k]}" for k in SEED_KNOBS if k in overrides)
        fail(f"{given} with --seeds {args.seeds}: --seeds sets seed and label_seed of every run (0…{args.seeds - 1}); "
             f"drop one of them")
    for name in ("dataset", "data_dir"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    options = options_from_args(args) if args.command == "run" else ClusterOptions()
    if options.executor == "slurm":
        from fastmem.experiments.cluster.options import check_slurm

        check_slurm()  # one line naming what is missing, before anything is written
    elif options.executor == "local":
        from fastmem.experiments.cluster.options import check_submitit

        check_submitit("local")
    out = Path(args.out) if options.executor == "inline" else Path(args.out).absolute()  # jobs may start elsewhere
    plans = {e.id: plan_experiment(e, args.scale, out, overrides, seeds=args.seeds) for e in experiments}
    selected = {eid: only_variants(plan, args.only) for eid, plan in plans.items()} if args.only else plans
    runs = [run for plan in selected.values() for run in plan]  # sweep.json keeps every run of the plan
    # every run of every experiment, before any starts (Slurm's runs: their device is checked where they run)
    validate_plan(runs, devices_here=options.executor != "slurm")
    if args.command == "show":
        if args.scale in SCALE_NOTES:
            print(SCALE_NOTES[args.scale])
        for experiment in experiments:
            print(f"experiment {experiment.id}: {experiment.title}")
            for run in selected[experiment.id]:
                state = "finished" if run.finished else ("interrupted" if (run.run_dir / "config.json").exists() else "new")
                seed = f" (seed {run.seed})" if args.seeds > 1 else ""
                print(f"  {run.variant.label}{seed} [{state}]\n    {' '.join(train_command(run, run.config.threads))}")
        return 0
    with hold_sweep_lock(out):  # one sweep runner per output folder
        if options.executor == "inline":
            return run_experiments(args, out, experiments, plans, runs)
        return run_on_cluster(args, options, out, experiments, plans, selected)


def only_variants(plan: Sequence[PlannedRun], only: str) -> list[PlannedRun]:
    """The runs of `plan` whose variant label contains one of `only`'s comma-separated texts, with their sources."""
    wanted = [text.strip() for text in only.split(",") if text.strip()]
    chosen = [run for run in plan if any(text in run.variant.label for text in wanted)]
    if not chosen:
        labels = sorted({run.variant.label for run in plan})
        fail(f"--only {only!r} matches no variant; the variants are: {'; '.join(labels)}")
    sources = {run.source_dir for run in chosen if run.source_dir is not None}
    return [run for run in plan if run in chosen or run.run_dir in sources]


def export_evidence(out: Path, dest: Path, ids: Sequence[str]) -> int:
    """`export`: each experiment's finished runs and plan into DEST, and its report rendered from DEST alone."""
    from fastmem.experiments.baselines import ensure_calibrated_baselines
    from fastmem.experiments.evidence import evidence_bytes, export_sweep
    from fastmem.report.render import write_report

    names = [i.upper() for i in ids] or sorted(p.parent.name for p in out.glob("*/sweep.json"))
    if not names:
        fail(f"{out}: no experiment folders (no */sweep.json); run python -m fastmem.experiments run first")
    for name in names:
        sweep_dir = out / name
        if not (sweep_dir / "sweep.json").is_file():
            fail(f"{sweep_dir}: no sweep.json; known here: {', '.join(p.parent.name for p in out.glob('*/sweep.json'))}")
        plan = json.loads((sweep_dir / "sweep.json").read_text())
        ensure_calibrated_baselines([(sweep_dir / e["run_dir"]).resolve() for e in plan["runs"]])
        target = export_sweep(sweep_dir, dest)
        print(f"{name}: {write_report(target, target)}")
    print(f"evidence in {dest}: {evidence_bytes(dest) / 2**20:.1f} MiB")
    return 0


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
    finish(args, rows, sweep_dirs, started)
    return 0


def finish(args: argparse.Namespace, rows: Sequence[Mapping[str, object]], sweep_dirs: Sequence[Path],
           started: float) -> None:
    """The summary table, the time taken and the reports: the end of every executor's run."""
    print(f"\n{summary_table(rows)}\n\ntook {(time.perf_counter() - started) / 60:.1f} min")
    if not args.no_report:
        from fastmem.experiments.baselines import ensure_calibrated_baselines
        from fastmem.report.render import write_report

        ensure_calibrated_baselines([row["run"].run_dir for row in rows])  # type: ignore[attr-defined]

        for sweep_dir in sweep_dirs:
            print(f"report: {write_report(sweep_dir, sweep_dir / 'report')}")


def run_on_cluster(args: argparse.Namespace, options: ClusterOptions, out: Path, experiments: Sequence[Experiment],
                   plans: Mapping[str, Sequence[PlannedRun]], selected: Mapping[str, Sequence[PlannedRun]]) -> int:
    """Write the plans and submit what is missing through submitit; with --wait (local: always) follow the jobs,
    then print the summary and write the reports as the inline runner does."""
    from fastmem.experiments.cluster.submit import run_on_cluster as submit_and_watch
    from fastmem.experiments.cluster.submit import unique_runs

    sweep_dirs = [write_plan(e, args.scale, out, plans[e.id]) for e in experiments]
    started = time.perf_counter()
    unique = unique_runs(selected)
    print(f"experiments {', '.join(plans)} at scale {args.scale}: {len(unique)} runs in {out / 'runs'}, "
          f"through {options.executor}", flush=True)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    outcome = submit_and_watch(out, selected, options, args.jobs, progress)
    if outcome is None:
        print(f"\nwatch: python -m fastmem.experiments status {out}\ncollect: the same run command with --wait "
              f"(it submits nothing twice), or python -m fastmem.report {out}/<ID> once they are done")
        return 0
    statuses, minutes = outcome
    failed = [s for s in statuses.values() if s.state != "done"]
    if failed:
        for status in failed:
            print(f"  {status.line()}")
        fail(f"{len(failed)} of {len(statuses)} runs did not finish ({', '.join(s.view.label for s in failed[:3])}"
             f"{', …' if len(failed) > 3 else ''}; status above); run the same command again to resubmit them")
    rows = [{"run": run, "status": "trained" if run_dir in minutes else "done earlier",
             "minutes": minutes.get(run_dir, 0.0)} for run_dir, (run, _) in unique.items()]
    finish(args, rows, sweep_dirs, started)
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
