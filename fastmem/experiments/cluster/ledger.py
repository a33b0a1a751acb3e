"""What was submitted, what the jobs say about themselves, and the state of every run built from both.

Files (all under OUT/<ID>/slurm/, beside submitit's own pickles and logs):
    jobs.json             the jobs submitted from experiment ID: one record per run (its latest job);
                          written only by the sweep runner, under the sweep lock
    <job>_fastmem.json    written by the job's rank 0 at each start and end: attempt, requeues, host,
                          the resume decision (the other ranks read it), exit status and error
A run's state: done (its summary.json), queued / running (its job is in the queue: squeue for Slurm,
the controller process for the local executor; a preempted run is queued, "requeuing", from the moment its
checkpoint is written until its job starts again), failed (its job ended without a summary), interrupted
(a config.json but no live job: it resumes when submitted again) or pending. Runs are shared between
experiments, so a run's job is looked up in the records of every experiment of OUT.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastmem.errors import FastmemError, fail
from fastmem.io_utils import write_json_atomic
from fastmem.run.metrics import RunRecords

LEDGER_NAME = "jobs.json"
LEDGER_FORMAT = "fastmem-jobs/1"
# squeue's states of a job that has not ended; the first group waits to start (again).
QUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT", "RESV_DEL_HOLD"})
LIVE_STATES = QUEUED_STATES | {"CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "RESIZING",
                               "SIGNALING", "STAGE_OUT"}


def slurm_folder(out: Path, experiment_id: str) -> Path:
    """Where an experiment's jobs keep their logs, pickles and records: OUT/<ID>/slurm."""
    return out / experiment_id / "slurm"


@dataclass(frozen=True)
class JobRecord:
    """One submitted job of one run."""

    run: str  # the run directory's name under OUT/runs
    label: str
    executor: str  # "slurm" or "local"
    job_id: str  # Slurm's id (array tasks as ARRAY_TASK) or the local controller's pid
    job_name: str
    log: str  # the job's log: stdout and stderr of rank 0, the trainer's output included
    folder: str  # submitit's folder
    submitted: float  # time.time() at submission

    @property
    def attempt_path(self) -> Path:
        return attempt_path(Path(self.folder), self.job_id)


def attempt_path(folder: Path, job_id: str) -> Path:
    """The job's own record of its current attempt."""
    return folder / f"{job_id}_fastmem.json"


def read_ledger(folder: Path) -> dict[str, JobRecord]:
    """The records of folder/jobs.json by run name ({} when there is none); a damaged file is one clear error."""
    path = folder / LEDGER_NAME
    if not path.exists():
        return {}
    try:
        payload = json.loads(path.read_text())
        if payload.get("format") != LEDGER_FORMAT:
            raise ValueError(f"format {payload.get('format')!r}")
        return {name: JobRecord(**entry) for name, entry in payload["jobs"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        fail(f"{path}: not a job record of fastmem ({type(err).__name__}: {err}); remove it to forget those jobs "
             f"(their runs are then resubmitted unless finished)")


def record_jobs(folder: Path, records: Sequence[JobRecord]) -> None:
    """Add (or replace) these runs' records in folder/jobs.json, atomically."""
    if not records:
        return
    jobs = read_ledger(folder)
    jobs.update({record.run: record for record in records})
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / LEDGER_NAME, {"format": LEDGER_FORMAT,
                                             "jobs": {name: dataclasses.asdict(r) for name, r in sorted(jobs.items())}})


def latest_jobs(out: Path) -> dict[str, JobRecord]:
    """Each run's latest job over the records of every experiment in OUT."""
    latest: dict[str, JobRecord] = {}
    for path in sorted(out.glob(f"*/slurm/{LEDGER_NAME}")):
        for name, record in read_ledger(path.parent).items():
            if name not in latest or record.submitted > latest[name].submitted:
                latest[name] = record
    return latest


def read_attempt(record: JobRecord) -> dict[str, Any]:
    """What the job last wrote about itself ({} before its first start, or when unreadable: it is being written)."""
    try:
        return json.loads(record.attempt_path.read_text())
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True)
class QueueEntry:
    state: str  # squeue's %T (RUNNING, PENDING, ...)
    reason: str  # squeue's %r (Dependency, BeginTime, ...; "None")
    name: str


@dataclass(frozen=True)
class Queue:
    """The jobs the executors still know, by job id; `error` when Slurm could not be asked."""

    entries: Mapping[str, QueueEntry]
    error: str | None = None


def squeue_entries() -> tuple[dict[str, QueueEntry], str | None]:
    """This user's Slurm jobs, array tasks one by one, or the one-line reason squeue failed."""
    command = ["squeue", "--noheader", "--array", "--user", getpass.getuser(), "--format", "%i|%T|%r|%j"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return {}, f"squeue: {err}"
    if result.returncode != 0:
        return {}, "squeue: " + (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1].removeprefix(
            "squeue: ")
    entries = {}
    for line in result.stdout.splitlines():
        parts = line.strip().split("|", 3)
        if len(parts) == 4:
            entries[parts[0]] = QueueEntry(parts[1], parts[2], parts[3])
    return entries, None


def local_job_alive(pid_text: str) -> bool:
    """Whether the local executor's controller `pid_text` still runs (not a zombie, still submitit's)."""
    try:
        pid = int(pid_text)
        stat = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (ValueError, OSError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z" and b"submitit" in command


def queue_snapshot(records: Iterable[JobRecord]) -> Queue:
    """Ask the executors once about these jobs."""
    records = list(records)
    entries: dict[str, QueueEntry] = {}
    error = None
    if any(r.executor == "slurm" for r in records):
        entries, error = squeue_entries()
    for record in records:
        if record.executor == "local" and local_job_alive(record.job_id):
            entries[record.job_id] = QueueEntry("RUNNING", "None", record.job_name)
    return Queue(entries, error)


def log_error_line(log: str | os.PathLike[str]) -> str:
    """The line of a job's log that says why it failed: the last `fastmem: error:`, else the end of the last
    traceback, else the last line ('' without a log)."""
    try:
        lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("fastmem: error:"):
            return line
    for index in range(len(lines) - 1, 0, -1):
        if lines[index - 1].startswith("Traceback") or (index + 1 < len(lines) and lines[index].startswith("File ")):
            continue
        if ("Error" in lines[index].split(":")[0] or "Exception" in lines[index].split(":")[0]) \
                and not lines[index].startswith("submitit"):
            return lines[index]
    return lines[-1] if lines else ""


@dataclass(frozen=True)
class RunView:
    """What a run's state needs: its label and seed, its directory and its planned epochs."""

    label: str
    seed: int
    run_dir: Path
    epochs: int


@dataclass(frozen=True)
class RunStatus:
    view: RunView
    state: str  # pending, interrupted, queued, running, done, failed, unknown
    job: JobRecord | None = None
    detail: str = ""
    requeues: int = 0
    metrics: str = ""

    @property
    def ended(self) -> bool:
        """Nothing is queued or running for this run (done, failed, or never submitted)."""
        return self.state not in ("queued", "running", "unknown")

    def line(self, label_width: int = 32, with_seed: bool = False) -> str:
        """One status line: label, state (epoch, reason or error), job id and requeues, last metrics, log."""
        label = self.view.label + (f" (seed {self.view.seed})" if with_seed else "")
        state = self.state + (f" {self.detail}" if self.detail and self.state != "failed" else "")
        parts = [f"{label:<{label_width}}", f"{state:<30}"]
        if self.job is not None:
            requeued = f", requeued {self.requeues}×" if self.requeues else ""
            parts.append(f"job {self.job.job_id}{requeued}")
        if self.metrics:
            parts.append(self.metrics)
        if self.job is not None:
            parts.append(f"log {self.job.log}")
        if self.state == "failed" and self.detail:
            parts.append(f"— {self.detail}")
        return "  ".join(parts)


def metrics_line(records: RunRecords) -> str:
    """The last fit and k-NN at h and z of a run's records ('' before its first record)."""
    parts = []
    fit = records.final_fit
    if fit is not None:
        parts.append(f"fit {100 * fit:.1f}%")
    for layer in ("h", "z"):
        accuracy = records.final_knn(layer)
        if accuracy is not None:
            parts.append(f"k-NN {layer} {100 * accuracy:.1f}%")
    return ", ".join(parts)


def run_status(view: RunView, job: JobRecord | None, queue: Queue) -> RunStatus:
    """The state of one run from its files, its latest job's record and the queue."""
    try:
        records = RunRecords.read(view.run_dir)
    except FastmemError:  # a damaged metrics file: the state still shows, its figures do not
        records = RunRecords([])
    metrics = metrics_line(records)
    attempt = read_attempt(job) if job is not None else {}
    requeues = max(int(attempt.get("requeues", 0)), int(attempt.get("restarts", 0)))
    common = dict(job=job, requeues=requeues, metrics=metrics)
    if (view.run_dir / "summary.json").exists():
        return RunStatus(view, "done", **common)
    if job is not None:
        entry = queue.entries.get(job.job_id)
        if entry is not None and entry.name != job.job_name:
            entry = None  # another job under a reused id
        if entry is not None and entry.state in QUEUED_STATES:
            reason = entry.reason if entry.reason not in ("None", "") else ""
            return RunStatus(view, "queued", detail=f"({reason})" if reason else "", **common)
        if entry is not None and entry.state in LIVE_STATES and attempt.get("state") == "requeued":
            # preempted: the trainer checkpointed, the job is on its way back to the queue
            return RunStatus(view, "queued", detail=f"(requeued at epoch {records.last_epoch}/{view.epochs})", **common)
        if entry is not None and entry.state in LIVE_STATES:
            return RunStatus(view, "running", detail=f"epoch {records.last_epoch}/{view.epochs}", **common)
        if job.executor == "slurm" and queue.error is not None and entry is None:
            return RunStatus(view, "unknown", detail=f"({queue.error})", **common)
        reason = str(attempt.get("error") or "")
        if not reason and entry is not None:
            reason = f"job {entry.state.lower()}"
        reason = reason or log_error_line(job.log) or "the job ended without finishing the run"
        return RunStatus(view, "failed", detail=reason, **common)
    if (view.run_dir / "config.json").exists():
        return RunStatus(view, "interrupted", detail=f"at epoch {records.last_epoch}/{view.epochs}", **common)
    return RunStatus(view, "pending", **common)


def sweep_views(sweep_dir: Path) -> list[RunView]:
    """The distinct runs of OUT/<ID>/sweep.json, in its order."""
    path = sweep_dir / "sweep.json"
    try:
        plan = json.loads(path.read_text())
        views: dict[Path, RunView] = {}
        for entry in plan["runs"]:
            run_dir = (sweep_dir / entry["run_dir"]).resolve()
            epochs = entry.get("epochs")
            if epochs is None and (run_dir / "config.json").exists():
                epochs = json.loads((run_dir / "config.json").read_text()).get("epochs")
            views.setdefault(run_dir, RunView(entry["label"], int(entry.get("seed", 0)), run_dir, int(epochs or 0)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        fail(f"{path}: not a sweep plan ({type(err).__name__}: {err}); run python -m fastmem.experiments run first")
    return list(views.values())
