"""The sweep runner: expand an experiment into trainer runs, run what is missing, resume what was cut.

Layout of an output folder:
    OUT/runs/<slug>-<digest>/   one ordinary `fastmem.train` run directory per distinct knob set
    OUT/<ID>/sweep.json         the experiment's plan: its variants and the run directory of each
Identical knob sets (the clean-label reference, a run two experiments share) map to one directory,
so they are trained once. `seeds` S > 1 plans every variant S times, seed s = 0…S-1 setting `seed` and
`label_seed` (on top of the spec's own values: J's retraining keeps its labels apart from its source's);
S = 1 plans exactly the runs of no seed option. The digest is the run's identity: RUN_FORMAT (the format and code version of
what a run computes) and every knob of the *resolved* TrainConfig (defaults filled in) but the
execution-only ones (threads, progress, device, ...: `execution` in fastmem/run/config.py), so a changed
recipe, a changed default or a new code version plans a new directory and never reuses a finished run.
A run with summary.json is finished and skipped; one with config.json but no summary is resumed from
its last checkpoint (exactly: the trainer's resume restores every RNG). A run directory whose
config.json holds other knobs than the plan's is refused before any run starts.
Runs go one per GPU on a multi-GPU machine, or `--jobs` side by side on a CPU; a line per run start and
finish, and optionally a progress bar per running run. Clusters (Slurm through submitit, and submitit's
local executor) take the same plan in fastmem/experiments/cluster/. The experiments CLI (fastmem/experiments/__main__.py)
and the main job (fastmem/experiments/demo.py) both plan, validate and run through here.
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

from fastmem import __version__
from fastmem.errors import FastmemError, fail
from fastmem.experiments.claims import claims_for
from fastmem.experiments.specs import SCALE_BASE, SCALES, SPECS, Experiment, Variant
from fastmem.io_utils import write_json_atomic
from fastmem.run.config import EXECUTION_KNOBS, TrainConfig, knob_type, load_run_config
from fastmem.run.lock import RunLock, hold_run_lock, remove_stale_temps
from fastmem.run.metrics import RunRecords

KNOB_NAMES = frozenset(f.name for f in dataclasses.fields(TrainConfig))
# The format and code version in every run's identity: bump the number when a change of fastmem alters what a
# finished run computed (its metrics or weights) without changing its knobs; the package version is in it too.
RUN_FORMAT = f"fastmem-run/2 fastmem {__version__}"


@dataclass(frozen=True)
class PlannedRun:
    """A variant bound to its run directory and full trainer config."""

    variant: Variant
    run_dir: Path
    config: TrainConfig
    source_dir: Path | None  # J: the run whose final checkpoint this one starts from
    seed: int = 0  # the run's training seed (config.seed): with --seeds S, one of 0…S-1

    @property
    def finished(self) -> bool:
        return (self.run_dir / "summary.json").exists()


def get_experiment(experiment_id: str) -> Experiment:
    """The spec with this id (A–K or MAIN, any case); an unknown id is a user error."""
    experiment = SPECS.get(experiment_id.upper())
    if experiment is None:
        fail(f"unknown experiment {experiment_id!r}; known: {', '.join(SPECS)}")
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


def identity_knobs(config: TrainConfig) -> dict[str, Any]:
    """The knobs of a resolved config that change what the run computes (execution-only knobs left out)."""
    return {k: v for k, v in sorted(config.to_dict().items()) if k not in EXECUTION_KNOBS}


def run_identity(config: TrainConfig, source_identity: str | None = None) -> str:
    """A short digest of everything that changes what a run computes: RUN_FORMAT and the resolved config's knobs.

    `source_identity`: the identity of the run whose checkpoint `init_from` names (J), in place of its path.
    """
    knobs = identity_knobs(config)
    knobs["precision"] = precision_identity(config)
    if source_identity is not None:
        knobs["init_from"] = source_identity
    payload = {"format": RUN_FORMAT, "knobs": knobs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]


def precision_identity(config: TrainConfig) -> str:
    """The precision a run trains in, as its identity sees it: `auto` on a CPU is this machine's decision.

    So a sweep folder continued on a machine that decides otherwise plans new runs instead of mixing
    precisions among its results. ('auto:bf16', 'auto:fp32'; other values as they are.)
    """
    if config.precision == "auto" and config.device == "cpu":
        from fastmem.cpu_precision import cpu_precision_choice

        return f"auto:{cpu_precision_choice().name}"
    return config.precision


def precision_handover(runs: Sequence[PlannedRun]) -> dict[str, str]:
    """The environment that hands this process's `auto` CPU decision to the runs it launches (decided once)."""
    from fastmem.cpu_precision import DECISION_ENV, cpu_precision_choice

    if any(run.config.precision == "auto" and run.config.device == "cpu" for run in runs):
        return {DECISION_ENV: cpu_precision_choice().to_env()}
    return {}


def _slug(variant_knobs: Mapping[str, Any]) -> str:
    text = "-".join(f"{k}{v}" for k, v in sorted(variant_knobs.items()) if k != "init_from") or "base"
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text)[:80]


SEED_KNOBS = ("seed", "label_seed")


def plan_experiment(experiment: Experiment, scale: str, out: Path, overrides: Mapping[str, Any],
                    seeds: int = 1) -> list[PlannedRun]:
    """Every variant of `experiment` at `scale` (for each of `seeds` seeds) as a run directory under out/runs.

    With seeds S > 1, seed s sets `seed` and `label_seed` to the spec's values plus s, above `overrides`
    (which set them only when S = 1). Runs come seed by seed, each seed in the spec's variant order.
    """
    if scale not in SCALES:
        fail(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    if seeds < 1:
        fail(f"--seeds {seeds}: expected at least 1")
    variants = experiment.variants(scale)
    by_label = {v.label: v for v in variants}
    planned: dict[tuple[str, int], PlannedRun] = {}
    identities: dict[tuple[str, int], str] = {}
    for s in range(seeds):
        for variant in sorted(variants, key=lambda v: v.init_from is not None):  # sources first
            unknown = sorted(set(variant.knobs) - KNOB_NAMES)
            if unknown:
                fail(f"experiment {experiment.id}, variant {variant.label!r}: unknown knob(s) {', '.join(unknown)}")
            spec = {**SCALE_BASE[scale], **experiment.knobs, **variant.knobs}
            knobs = {**spec, **overrides}
            if seeds > 1:
                knobs.update({name: int(spec.get(name, 0)) + s for name in SEED_KNOBS})
            source_dir, source_identity = None, None
            if variant.init_from is not None:
                if variant.init_from not in by_label:
                    fail(f"experiment {experiment.id}: variant {variant.label!r} starts from unknown {variant.init_from!r}")
                source = planned[(variant.init_from, s)]  # the same seed's source
                source_dir, source_identity = source.run_dir, identities[(variant.init_from, s)]
                knobs["init_from"] = str(source_dir / "checkpoint.pt")
            resolved = TrainConfig(**knobs)  # every default filled in: the identity sees what the trainer will run
            identity = run_identity(resolved, source_identity)
            run_dir = out / "runs" / f"{_slug(variant.knobs)}-{identity}"
            config = dataclasses.replace(resolved, out=str(run_dir))
            identities[(variant.label, s)] = identity
            planned[(variant.label, s)] = PlannedRun(variant, run_dir, config, source_dir, seed=resolved.seed)
    return [planned[(v.label, s)] for s in range(seeds) for v in variants]


def validate_plan(runs: Sequence[PlannedRun], devices_here: bool = True) -> None:
    """Check every run's knobs and that its data is there, before any run starts.

    `devices_here` False (runs submitted to other machines, e.g. Slurm from a login node without a GPU): the
    device and precision are left to the trainer on the machine that runs it (a bad one fails that job)."""
    from fastmem.data.splits import select_run_data
    from fastmem.runtime import PRECISIONS
    from fastmem.train.build import validate
    from fastmem.train.reinit import check_init_knobs

    checked: set[tuple[Any, ...]] = set()
    for run in runs:
        check_saved_config(run)
        cfg = run.config
        if not devices_here:
            cfg = dataclasses.replace(cfg, device="cpu", precision="fp32" if cfg.precision in PRECISIONS else cfg.precision)
        if run.source_dir is not None and not run.finished:  # its source's checkpoint may not exist yet
            validate(dataclasses.replace(cfg, init_from="", reinit=""))
            check_init_knobs(cfg.init_from, cfg.reinit, cfg.model, cfg.width, cfg.bottleneck_dim, checkpoint_must_exist=False)
        else:
            validate(cfg)
        key = (cfg.dataset, cfg.data_dir, cfg.subset, cfg.probe_reference, cfg.image_size)
        if key not in checked:
            select_run_data(cfg.dataset, cfg.data_dir, subset=cfg.subset, probe_subset=cfg.probe_subset,
                            image_size=cfg.image_size, seed=cfg.data_seed, probe_reference=cfg.probe_reference)
            checked.add(key)


def check_saved_config(run: PlannedRun) -> None:
    """Refuse a run directory whose config.json holds other knobs than the plan's (it is not this run).

    Its name carries the identity, so this only happens when a directory was copied, renamed or edited by
    hand; reusing or resuming it would report another recipe's results under this one's label.
    """
    path = run.run_dir / "config.json"
    if not path.exists():
        return
    try:
        saved = load_run_config(run.run_dir)
    except FastmemError as err:
        fail(f"{err}; remove {run.run_dir} to train it again")  # the message names config.json
    planned, found = identity_knobs(run.config), identity_knobs(saved)
    planned.pop("init_from"), found.pop("init_from")  # a path; the identity in the name covers the source
    differ = sorted(k for k in planned if planned[k] != found.get(k))
    if differ:
        shown = ", ".join(f"{k} {found.get(k)!r} (planned {planned[k]!r})" for k in differ[:3])
        fail(f"{path}: this run directory holds another run ({shown}); remove {run.run_dir} or choose another --out")


SWEEP_LOCK_HINT = "wait for it or choose another --out"


def hold_sweep_lock(out: Path) -> RunLock:
    """Take OUT/.lock for this sweep runner (one per output folder) and clear OUT's stale temporary files.

    The run directories under OUT/runs are left to their trainers, which hold their own locks.
    """
    lock = hold_run_lock(out, hint=SWEEP_LOCK_HINT)
    try:
        remove_stale_temps(out)
    except BaseException:
        lock.release()
        raise
    return lock


def write_plan(experiment: Experiment, scale: str, out: Path, runs: Sequence[PlannedRun]) -> Path:
    """OUT/<ID>/sweep.json: what the report reads (run paths relative to the sweep folder)."""
    sweep_dir = out / experiment.id
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(sweep_dir / "sweep.json", {
        "experiment": experiment.id, "title": experiment.title, "varies": experiment.varies,
        "expectation": experiment.expectation, "scale": scale, "x_label": experiment.x_label,
        "plots": list(experiment.plots), "note": experiment.notes.get(scale, ""),
        "seeds": len({r.seed for r in runs}),
        "claims": [claim.to_dict() for claim in claims_for(experiment.id, scale)],  # judged by the report
        "runs": [{"label": r.variant.label, "role": r.variant.role, "value": r.variant.value, "group": r.variant.group,
                  "run_dir": os.path.relpath(r.run_dir, sweep_dir), "knobs": dict(r.variant.knobs),
                  "init_from": r.variant.init_from, "seed": r.seed, "epochs": r.config.epochs} for r in runs],
    })
    return sweep_dir


def train_command(run: PlannedRun, threads: int, resume: bool | None = None) -> list[str]:
    """The `python -m fastmem.train` command that starts or resumes `run` (`resume` None: resume when it has a
    config.json)."""
    if resume is None:
        resume = (run.run_dir / "config.json").exists()
    if resume:
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
    records = RunRecords.read(run.run_dir)
    fit = records.final_fit
    parts = [f"fit {100 * fit:.1f}%"] if fit is not None else []
    for layer in ("h", "z"):
        accuracy = records.final_knn(layer)
        if accuracy is not None:
            parts.append(f"k-NN {layer} {100 * accuracy:.1f}%")
    return ", ".join(parts)


class _Progress:
    """Run start/finish lines, and optionally one tqdm bar per running run (epochs done, from its metrics)."""

    def __init__(self, bars: bool, every_s: float = 2.0) -> None:
        self.bars: dict[Path, Any] | None = {} if bars else None
        self.every_s = every_s
        self.updated = 0.0

    def say(self, line: str) -> None:
        if self.bars is None:
            print(line, flush=True)
        else:
            from tqdm import tqdm

            tqdm.write(line)

    def start(self, run: PlannedRun, slot: int) -> None:
        if self.bars is not None:
            from tqdm import tqdm

            self.bars[run.run_dir] = tqdm(total=run.config.epochs, initial=RunRecords.read(run.run_dir).last_epoch,
                                          desc=f"{run.variant.label[:32]:>32}", unit="epoch", position=slot, leave=False)

    def update(self) -> None:
        if self.bars is None or time.perf_counter() - self.updated < self.every_s:
            return
        self.updated = time.perf_counter()
        for run_dir, bar in self.bars.items():
            bar.update(RunRecords.read(run_dir).last_epoch - bar.n)

    def finish(self, run: PlannedRun) -> None:
        if self.bars is not None and run.run_dir in self.bars:
            self.bars.pop(run.run_dir).close()

    def close(self) -> None:
        for bar in (self.bars or {}).values():
            bar.close()


@dataclass
class _Job:
    run: PlannedRun
    process: subprocess.Popen[bytes]
    slot: int
    started: float


def run_plan(runs: Sequence[PlannedRun], jobs: int, gpus: int, threads: int | None = None,
             progress: bool = False) -> list[dict[str, Any]]:
    """Train every unfinished run (dependencies first), one per GPU when `gpus` > 0, else `jobs` side by side
    on the CPU (0 = one per core) with `threads` each (default cores // jobs); `progress`: a bar per running run.
    Returns one summary row per distinct run."""
    unique: dict[Path, PlannedRun] = {}
    for run in runs:
        unique.setdefault(run.run_dir, run)
    pending = [r for r in unique.values() if not r.finished]
    rows = {r.run_dir: {"run": r, "status": "done earlier", "minutes": 0.0} for r in unique.values() if r.finished}
    total = len(pending)
    show = _Progress(progress)
    for row in rows.values():
        show.say(f"[skip] {row['run'].variant.label}: finished earlier ({_final_line(row['run'])})")
    slots = gpus if gpus else max(1, jobs or os.cpu_count() or 1)  # one run per GPU; else `jobs` CPU runs
    if gpus:
        threads = 0
    elif not threads:
        threads = max(1, (os.cpu_count() or 1) // slots)
    running: list[_Job] = []
    done_count = 0
    handover = precision_handover(pending)  # every run of the sweep trains in one decided precision

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
                env = {**os.environ, "PYTHONUNBUFFERED": "1", **handover}
                if gpus > 1:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot)
                resumed = (run.run_dir / "config.json").exists()
                with open(run.run_dir / "train.log", "ab") as log:
                    process = subprocess.Popen(train_command(run, threads), stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append(_Job(run, process, slot, time.perf_counter()))
                show.say(f"[start {done_count + len(running)}/{total}] {run.variant.label}"
                         f"{' (resumed)' if resumed else ''} → {run.run_dir}")
                show.start(run, slot)
            if not running:
                blocked = ", ".join(r.variant.label for r in pending)
                fail(f"runs wait on sources that did not finish: {blocked}")
            time.sleep(0.5)
            show.update()
            for job in [j for j in running if j.process.poll() is not None]:
                running.remove(job)
                show.finish(job.run)
                minutes = (time.perf_counter() - job.started) / 60
                if job.process.returncode != 0:
                    for other in running:
                        other.process.terminate()
                        other.process.wait()
                    tail = (job.run.run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-1:]
                    fail(f"run {job.run.variant.label!r} failed (see {job.run.run_dir / 'train.log'}): {' '.join(tail)}")
                done_count += 1
                rows[job.run.run_dir] = {"run": job.run, "status": "trained", "minutes": minutes}
                show.say(f"[done {done_count}/{total}] {job.run.variant.label} in {minutes:.1f} min: {_final_line(job.run)}")
    finally:
        show.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return [rows[run_dir] for run_dir in unique]


def summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of run_plan's rows: status, minutes and the final fit and k-NN at h and z."""
    lines = ["| run | status | minutes | result |", "|---|---|---|---|"]
    for row in rows:
        run = row["run"]
        lines.append(f"| {run.variant.label} | {row['status']} | {row['minutes']:.1f} | {_final_line(run)} |")
    return "\n".join(lines)
