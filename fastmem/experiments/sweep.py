"""The sweep runner: expand an experiment into trainer runs, run what is missing, resume what was cut.

Layout of an output folder:
    OUT/runs/<slug>-<digest>/   one ordinary `fastmem.train.loop` run directory per distinct knob set
    OUT/<ID>/sweep.json         the experiment's plan: its variants and the run directory of each
Identical knob sets (the clean-label reference, a run two experiments share) map to one directory,
so they are trained once. A run with summary.json is finished and skipped; one with config.json but
no summary is resumed from its last checkpoint (exactly: the trainer's resume restores every RNG).
Runs go one per GPU on a multi-GPU machine, or `--jobs` side by side on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastmem.errors import fail
from fastmem.experiments.specs import EXPERIMENTS, SCALE_BASE, SCALES, Experiment, Variant
from fastmem.io_utils import write_json_atomic
from fastmem.run.config import EXECUTION_KNOBS, TrainConfig, knob_type
from fastmem.run.metrics import read_metrics

KNOB_NAMES = frozenset(f.name for f in dataclasses.fields(TrainConfig))


@dataclass(frozen=True)
class PlannedRun:
    """A variant bound to its run directory and full trainer config."""

    variant: Variant
    run_dir: Path
    config: TrainConfig
    source_dir: Path | None  # J: the run whose final checkpoint this one starts from

    @property
    def finished(self) -> bool:
        return (self.run_dir / "summary.json").exists()


def get_experiment(experiment_id: str) -> Experiment:
    experiment = EXPERIMENTS.get(experiment_id.upper())
    if experiment is None:
        fail(f"unknown experiment {experiment_id!r}; known: {', '.join(EXPERIMENTS)}")
    return experiment


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`KNOB=VALUE` strings → typed trainer knobs (types from TrainConfig); unknown knobs are errors."""
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in KNOB_NAMES:
            fail(f"--set {pair!r}: expected KNOB=VALUE with a trainer knob (see python -m fastmem.train --help)")
        kind = knob_type(name)
        try:
            values[name] = kind(text)
        except (ValueError, argparse.ArgumentTypeError):
            fail(f"--set {pair!r}: {name} expects {getattr(kind, '__name__', 'a value').lstrip('_')}")
    return values


def run_identity(knobs: Mapping[str, Any]) -> str:
    """A short digest of everything that changes what a run computes."""
    relevant = {k: v for k, v in sorted(knobs.items()) if k not in EXECUTION_KNOBS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _slug(variant_knobs: Mapping[str, Any]) -> str:
    text = "-".join(f"{k}{v}" for k, v in sorted(variant_knobs.items()) if k != "init_from") or "base"
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text)[:80]


def plan_experiment(experiment: Experiment, scale: str, out: Path, overrides: Mapping[str, Any]) -> list[PlannedRun]:
    """Every variant of `experiment` at `scale` as a run directory under out/runs, validated up front."""
    if scale not in SCALES:
        fail(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    variants = experiment.variants(scale)
    by_label = {v.label: v for v in variants}
    planned: dict[str, PlannedRun] = {}
    identities: dict[str, str] = {}
    for variant in sorted(variants, key=lambda v: v.init_from is not None):  # sources first
        unknown = sorted(set(variant.knobs) - KNOB_NAMES)
        if unknown:
            fail(f"experiment {experiment.id}, variant {variant.label!r}: unknown knob(s) {', '.join(unknown)}")
        knobs = {**SCALE_BASE[scale], **variant.knobs, **overrides}
        identity_knobs = dict(knobs)
        source_dir = None
        if variant.init_from is not None:
            if variant.init_from not in by_label:
                fail(f"experiment {experiment.id}: variant {variant.label!r} starts from unknown {variant.init_from!r}")
            source = planned[variant.init_from]
            source_dir = source.run_dir
            knobs["init_from"] = str(source_dir / "checkpoint.pt")
            identity_knobs["init_from"] = identities[variant.init_from]
        identity = run_identity(identity_knobs)
        run_dir = out / "runs" / f"{_slug(variant.knobs)}-{identity}"
        config = TrainConfig(**{**knobs, "out": str(run_dir)})
        identities[variant.label] = identity
        planned[variant.label] = PlannedRun(variant, run_dir, config, source_dir)
    return [planned[v.label] for v in variants]


def validate_plan(runs: Sequence[PlannedRun]) -> None:
    """Check every run's knobs and that its data is there, before any run starts."""
    from fastmem.data.splits import select_run_data
    from fastmem.train.loop import validate
    from fastmem.train.reinit import check_init_knobs

    checked: set[tuple[Any, ...]] = set()
    for run in runs:
        cfg = run.config
        if run.source_dir is not None and not run.finished:  # its source's checkpoint may not exist yet
            validate(dataclasses.replace(cfg, init_from="", reinit=""))
            check_init_knobs(cfg.init_from, cfg.reinit, cfg.model, cfg.width, cfg.bottleneck_dim, checkpoint_must_exist=False)
        else:
            validate(cfg)
        key = (cfg.dataset, cfg.data_dir, cfg.subset, cfg.image_size)
        if key not in checked:
            select_run_data(cfg.dataset, cfg.data_dir, subset=cfg.subset, probe_subset=cfg.probe_subset,
                            image_size=cfg.image_size, seed=cfg.seed)
            checked.add(key)


def write_plan(experiment: Experiment, scale: str, out: Path, runs: Sequence[PlannedRun]) -> Path:
    """OUT/<ID>/sweep.json: what the report reads (run paths relative to the sweep folder)."""
    sweep_dir = out / experiment.id
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(sweep_dir / "sweep.json", {
        "experiment": experiment.id, "title": experiment.title, "varies": experiment.varies,
        "expectation": experiment.expectation, "scale": scale, "x_label": experiment.x_label,
        "plots": list(experiment.plots), "note": experiment.notes.get(scale, ""),
        "runs": [{"label": r.variant.label, "role": r.variant.role, "value": r.variant.value, "group": r.variant.group,
                  "run_dir": os.path.relpath(r.run_dir, sweep_dir), "knobs": dict(r.variant.knobs),
                  "init_from": r.variant.init_from} for r in runs],
    })
    return sweep_dir


def train_command(run: PlannedRun, threads: int) -> list[str]:
    """The `python -m fastmem.train` command that starts or resumes `run`."""
    if (run.run_dir / "config.json").exists():
        return [sys.executable, "-m", "fastmem.train", "--resume", str(run.run_dir), "--threads", str(threads),
                "--progress", "false"]
    command = [sys.executable, "-m", "fastmem.train"]
    defaults = TrainConfig()
    for name, value in dataclasses.asdict(run.config).items():
        if (value != getattr(defaults, name) or name == "out") and not (name == "threads" and threads):
            command += ["--" + name.replace("_", "-"), str(value)]
    if threads:
        command += ["--threads", str(threads)]
    return command


def _final_line(run: PlannedRun) -> str:
    records = read_metrics(run.run_dir / "metrics.jsonl")
    fit = [r["train_acc_random"] for r in records if "train_acc_random" in r]
    probes = [r for r in records if any(k.startswith("knn/") for k in r)]
    parts = [f"fit {100 * fit[-1]:.1f}%"] if fit else []
    if probes:
        parts += [f"k-NN {name[4:]} {100 * value:.1f}%" for name, value in probes[-1].items()
                  if name in ("knn/h", "knn/z")]
    return ", ".join(parts)


@dataclass
class _Job:
    run: PlannedRun
    process: subprocess.Popen[bytes]
    slot: int
    started: float


def run_plan(runs: Sequence[PlannedRun], jobs: int, gpus: int) -> list[dict[str, Any]]:
    """Train every unfinished run (dependencies first), one per GPU when `gpus` > 0, else `jobs` side by side
    on the CPU (0 = one per core); returns one summary row per distinct run."""
    unique: dict[Path, PlannedRun] = {}
    for run in runs:
        unique.setdefault(run.run_dir, run)
    pending = [r for r in unique.values() if not r.finished]
    rows = {r.run_dir: {"run": r, "status": "done earlier", "minutes": 0.0} for r in unique.values() if r.finished}
    total = len(pending)
    for row in rows.values():
        print(f"[skip] {row['run'].variant.label}: finished earlier ({_final_line(row['run'])})", flush=True)
    slots = gpus if gpus else max(1, jobs or os.cpu_count() or 1)  # one run per GPU; else `jobs` CPU runs
    threads = 0 if gpus else max(1, (os.cpu_count() or 1) // slots)
    running: list[_Job] = []
    done_count = 0

    def stop_all(signum: int, frame: Any) -> None:
        for job in running:
            job.process.terminate()
        for job in running:
            job.process.wait()
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while pending or running:
            free = sorted(set(range(slots)) - {j.slot for j in running})
            ready = [r for r in pending if r.source_dir is None or (r.source_dir / "summary.json").exists()]
            while free and ready:
                run = ready.pop(0)
                pending.remove(run)
                run.run_dir.mkdir(parents=True, exist_ok=True)
                slot = free.pop(0)
                env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                if gpus > 1:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot)
                resumed = (run.run_dir / "config.json").exists()
                with open(run.run_dir / "train.log", "ab") as log:
                    process = subprocess.Popen(train_command(run, threads), stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append(_Job(run, process, slot, time.perf_counter()))
                print(f"[start {done_count + len(running)}/{total}] {run.variant.label}"
                      f"{' (resumed)' if resumed else ''} → {run.run_dir}", flush=True)
            if not running:
                blocked = ", ".join(r.variant.label for r in pending)
                fail(f"runs wait on sources that did not finish: {blocked}")
            time.sleep(0.5)
            for job in [j for j in running if j.process.poll() is not None]:
                running.remove(job)
                minutes = (time.perf_counter() - job.started) / 60
                if job.process.returncode != 0:
                    for other in running:
                        other.process.terminate()
                        other.process.wait()
                    tail = (job.run.run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-1:]
                    fail(f"run {job.run.variant.label!r} failed (see {job.run.run_dir / 'train.log'}): {' '.join(tail)}")
                done_count += 1
                rows[job.run.run_dir] = {"run": job.run, "status": "trained", "minutes": minutes}
                print(f"[done {done_count}/{total}] {job.run.variant.label} in {minutes:.1f} min: {_final_line(job.run)}",
                      flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return [rows[run_dir] for run_dir in unique]


def summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| run | status | minutes | result |", "|---|---|---|---|"]
    for row in rows:
        run = row["run"]
        lines.append(f"| {run.variant.label} | {row['status']} | {row['minutes']:.1f} | {_final_line(run)} |")
    return "\n".join(lines)
