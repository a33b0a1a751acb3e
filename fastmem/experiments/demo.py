"""The main job (`make demo`): benign versus malign memorization on Fashion-MNIST, on a CPU.

Trains the small CNN on entirely random labels twice — with the paper's full augmentation and with
none — probes every layer with k-NN against the true labels (untrained, during and after training),
prints a per-layer table and writes a PNG plot and a markdown summary. Each run is an ordinary
`fastmem.train.loop` run directory: finished runs are reused, interrupted ones resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fastmem.errors import fail, run_cli
from fastmem.io_utils import atomic_path
from fastmem.report.demo_plots import knn_layers, plot_benign_vs_malign, probe_records
from fastmem.run.metrics import read_metrics

RUNS = {"full augmentation": "full", "no augmentation": "none"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastmem.demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Random labels with and without augmentation on Fashion-MNIST; per-layer k-NN table and plot.",
    )
    parser.add_argument("--out", default="demo_out", help="output directory (run directories, plot, summary)")
    parser.add_argument("--dataset", default="fashion-mnist", help="dataset (see python -m fastmem.train --help)")
    parser.add_argument("--data-dir", default=None, help="where the dataset files are")
    parser.add_argument("--subset", type=int, default=5000, help="training images (a seeded random subset)")
    parser.add_argument("--probe-subset", type=int, default=2000, help="test images used as k-NN queries")
    parser.add_argument("--epochs", type=int, default=100, help="epochs per run")
    parser.add_argument("--probe-every", type=int, default=20, help="k-NN probe every E epochs")
    parser.add_argument("--width", type=float, default=0.5, help="width multiplier of the small CNN")
    parser.add_argument("--bottleneck-dim", type=int, default=4096, help="projector width B")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of labels, initialisation and augmentation")
    parser.add_argument("--sequential", action="store_true",
                        help="run the two trainings one after the other with all threads (default: side by side, one core each)")
    return parser


def train_command(args: argparse.Namespace, augment: str, run_dir: Path, threads: int) -> list[str]:
    command = [
        sys.executable, "-m", "fastmem.train", "--dataset", args.dataset, "--subset", str(args.subset),
        "--probe-subset", str(args.probe_subset), "--epochs", str(args.epochs), "--probe-every", str(args.probe_every),
        "--augment", augment, "--label-noise", "1", "--label-seed", str(args.seed), "--seed", str(args.seed),
        "--model", "small_cnn", "--width", str(args.width), "--bottleneck-dim", str(args.bottleneck_dim),
        "--batch-size", str(args.batch_size), "--loss", "mse", "--optimizer", "adam", "--lr", "3e-4",
        "--device", "cpu", "--precision", "fp32", "--threads", str(threads), "--progress", "false",
        "--checkpoint-every", "10",
    ]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    if (run_dir / "config.json").exists():
        return command + ["--resume", str(run_dir)]
    return command + ["--out", str(run_dir)]


def run_trainings(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    """Start (or resume) the two runs, show their progress, and wait; a failed run is a user-facing error."""
    run_dirs = {label: out / f"random-labels-{augment}-aug" for label, augment in RUNS.items()}
    pending = {label: d for label, d in run_dirs.items() if not (d / "summary.json").exists()}
    threads = 1 if not args.sequential else max(1, os.cpu_count() or 1)
    groups = [list(pending)] if not args.sequential else [[label] for label in pending]
    for group in groups:
        procs = {}
        for label in group:
            run_dirs[label].mkdir(parents=True, exist_ok=True)
            log = open(run_dirs[label] / "train.log", "a")
            procs[label] = (subprocess.Popen(train_command(args, RUNS[label], run_dirs[label], threads),
                                             stdout=log, stderr=subprocess.STDOUT), log)
        bars = {label: tqdm(total=args.epochs, desc=f"{label:>18}", unit="epoch", position=i, leave=True)
                for i, label in enumerate(group)}
        while any(proc.poll() is None for proc, _ in procs.values()):
            time.sleep(2)
            for label, bar in bars.items():
                done = max((r.get("epoch", 0) for r in read_metrics(run_dirs[label] / "metrics.jsonl")), default=0)
                bar.update(done - bar.n)
        for label, (proc, log) in procs.items():
            log.close()
            bars[label].close()
            if proc.returncode != 0:
                tail = (run_dirs[label] / "train.log").read_text().strip().splitlines()[-1:]
                fail(f"the {label} run failed (see {run_dirs[label] / 'train.log'}): {' '.join(tail)}")
    return run_dirs


def per_layer_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown table: k-NN accuracy per layer for the untrained net and each run's final probe."""
    first = next(iter(runs.values()))
    untrained = probe_records(first)[0]
    finals = {label: probe_records(records)[-1] for label, records in runs.items()}
    head = "| probe point | untrained | " + " | ".join(f"{label} (epoch {r['epoch']})" for label, r in finals.items()) + " |"
    lines = [head, "|" + "---|" * (2 + len(finals))]
    for layer in knn_layers(first):
        cells = [f"{100 * untrained[f'knn/{layer}']:.1f}"] + [f"{100 * r[f'knn/{layer}']:.1f}" for r in finals.values()]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    fits = [f"{100 * [r for r in records if 'train_acc_random' in r][-1]['train_acc_random']:.1f}" for records in runs.values()]
    lines.append("| *fit of random labels (train acc., last epoch)* | – | " + " | ".join(fits) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.epochs < 1 or args.subset < args.batch_size:
        fail("--epochs must be >= 1 and --subset at least one batch")
    out = Path(args.out)
    started = time.perf_counter()
    run_dirs = run_trainings(args, out)
    runs = {label: read_metrics(d / "metrics.jsonl") for label, d in run_dirs.items()}
    table = per_layer_table(runs)
    plot = plot_benign_vs_malign(runs, out / "benign_vs_malign.png",
                                 f"Random labels on {args.dataset} ({args.subset} images): k-NN on the true labels per layer")
    wall = time.perf_counter() - started
    summary = (f"# Benign vs malign memorization ({args.dataset}, {args.subset} images, random labels)\n\n"
               f"k-NN (k=20, cosine, majority vote) accuracy in % on {args.probe_subset} test images, "
               f"reference = the training images with their true labels.\n\n{table}\n\n![plot]({plot.name})\n")
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(summary)
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps({"runs": {k: str(v) for k, v in run_dirs.items()}, "wall_seconds": wall}, indent=2))
    print("\n" + table + f"\n\nplot: {plot}\nsummary: {out / 'summary.md'}  (this invocation took {wall / 60:.1f} min)")
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)


if __name__ == "__main__":
    cli()
