"""Submitting a sweep's pending runs through submitit, and waiting for them to end.

Slurm: every pending run of an experiment is one task of a job array (`submit_array`, so each task is its
own Checkpointable), submitted at once; J's runs whose source is not finished wait for it through
`--dependency=afterok:<source's job>` (`--kill-on-invalid-dep=yes`: a failed source ends them too).
Runs already finished, or whose latest job is still queued or running, are not submitted (again).
Local: submitit's LocalExecutor runs them on this machine, at most `--jobs` at a time, a J run once its
source is finished. Either way `watch` follows the runs (a line per change of state, an optional
progress bar over their epochs) until none is queued or running, and returns their final states.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fastmem.errors import fail
from fastmem.experiments.cluster.ledger import (
    JobRecord,
    RunStatus,
    RunView,
    latest_jobs,
    queue_snapshot,
    record_jobs,
    run_status,
    slurm_folder,
)
from fastmem.experiments.cluster.options import PREEMPT_SIGNAL, ClusterOptions, load_submitit
from fastmem.experiments.sweep import PlannedRun

QUEUE_ERRORS_TOLERATED = 30  # polls in a row that may fail to reach Slurm before `watch` gives up


def _submitit() -> Any:
    return load_submitit()


def view_of(run: PlannedRun) -> RunView:
    return RunView(run.variant.label, run.seed, run.run_dir, run.config.epochs)


def unique_runs(plans: Mapping[str, Sequence[PlannedRun]]) -> dict[Path, tuple[PlannedRun, str]]:
    """Each distinct run once, with the first experiment that plans it (its jobs live in that one's folder)."""
    unique: dict[Path, tuple[PlannedRun, str]] = {}
    for experiment_id, plan in plans.items():
        for run in plan:
            unique.setdefault(run.run_dir, (run, experiment_id))
    return unique


def _train_job(run: PlannedRun, folder: Path, options: ClusterOptions) -> Any:
    from fastmem.experiments.cluster.job import TrainJob

    return TrainJob(run, str(folder), options.cpus_per_run, max(10.0, options.signal_delay_s - 20.0),
                    options.max_requeues)


def slurm_executor(folder: Path, experiment_id: str, options: ClusterOptions, dependency: str = "") -> Any:
    """A SlurmExecutor for one experiment's folder with the user's resources (and a dependency, for J)."""
    submitit = _submitit()
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=options.max_requeues)
    extra: dict[str, Any] = {"requeue": True, **options.extra}
    params: dict[str, Any] = {"job_name": f"fastmem-{experiment_id}", "time": options.time_min,
                              "ntasks_per_node": options.tasks, "signal_delay_s": options.signal_delay_s,
                              "stderr_to_stdout": True, "setup": [f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}"],
                              "wckey": None, "additional_parameters": extra}
    for name, value in (("partition", options.partition), ("cpus_per_task", options.cpus_per_run),
                        ("gpus_per_node", options.gpus_per_run), ("mem", options.mem), ("account", options.account),
                        ("qos", options.qos), ("array_parallelism", options.array_parallelism)):
        if value:
            params[name] = value
    if dependency:
        params["dependency"] = dependency
        extra["kill-on-invalid-dep"] = "yes"
    executor.update_parameters(**params)
    return executor


def _records(jobs: Sequence[Any], runs: Sequence[PlannedRun], executor: str, name: str, folder: Path) -> list[JobRecord]:
    now = time.time()
    return [JobRecord(run.run_dir.name, run.variant.label, executor, str(job.job_id), name, str(job.paths.stdout),
                      str(folder), now) for job, run in zip(jobs, runs)]


def submit_slurm(out: Path, todo: Sequence[tuple[PlannedRun, str]], live: Mapping[str, JobRecord],
                 options: ClusterOptions) -> list[JobRecord]:
    """Submit `todo` (run, experiment id) as job arrays, sources before the J runs that wait on them."""
    submitted: dict[Path, JobRecord] = {}
    waiting = list(todo)
    while waiting:
        groups: dict[tuple[str, str], list[PlannedRun]] = {}
        later = []
        for run, experiment_id in waiting:
            dependency = ""
            if run.source_dir is not None and not (run.source_dir / "summary.json").exists():
                source = submitted.get(run.source_dir) or live.get(run.source_dir.name)
                if source is None:
                    later.append((run, experiment_id))  # its source is submitted in this pass
                    continue
                dependency = f"afterok:{source.job_id}"
            groups.setdefault((experiment_id, dependency), []).append(run)
        if not groups:
            fail("runs wait on sources that are neither finished nor submitted: "
                 + ", ".join(run.variant.label for run, _ in later))
        for (experiment_id, dependency), runs in groups.items():
            folder = slurm_folder(out, experiment_id)
            executor = slurm_executor(folder, experiment_id, options, dependency)
            try:
                jobs = executor.submit_array([_train_job(run, folder, options) for run in runs])
            except Exception as err:  # sbatch's refusal (bad partition, account, ...) as submitit reports it
                lines = [line.strip() for line in str(err).splitlines() if line.strip() and "error" in line.lower()]
                fail(f"sbatch refused the jobs of experiment {experiment_id}: "
                     f"{(lines or [str(err).strip()])[-1]}"
                     + (f" ({len(submitted)} runs were submitted before; see their status)" if submitted else ""))
            records = _records(jobs, runs, "slurm", f"fastmem-{experiment_id}", folder)
            record_jobs(folder, records)
            submitted.update({run.run_dir: record for run, record in zip(runs, records)})
            for record in records:
                print(f"[submitted] {record.label}: job {record.job_id}"
                      f"{f' after {dependency[8:]}' if dependency else ''}, log {record.log}", flush=True)
        waiting = later
    return list(submitted.values())


class LocalStarter:
    """Starts ready runs through submitit's LocalExecutor, at most `slots` at a time (one GPU set each)."""

    def __init__(self, out: Path, todo: Sequence[tuple[PlannedRun, str]], options: ClusterOptions, slots: int,
                 gpus: int) -> None:
        self.out, self.options, self.slots, self.gpus = out, options, max(1, slots), gpus
        self.waiting = list(todo)
        self.running: dict[Path, tuple[Any, int]] = {}  # run_dir → (job, slot)

    @property
    def idle(self) -> bool:
        return not self.running and not self.ready()

    def ready(self) -> list[tuple[PlannedRun, str]]:
        return [(run, e) for run, e in self.waiting
                if run.source_dir is None or (run.source_dir / "summary.json").exists()]

    def __call__(self, statuses: Mapping[Path, RunStatus]) -> None:
        for run_dir, (job, _) in list(self.running.items()):
            if job.done():
                del self.running[run_dir]
        submitit = _submitit()
        for run, experiment_id in self.ready():
            free = sorted(set(range(self.slots)) - {slot for _, slot in self.running.values()})
            if not free:
                break
            folder = slurm_folder(self.out, experiment_id)
            executor = submitit.LocalExecutor(folder=folder, max_num_timeout=self.options.max_requeues)
            per_run = self.options.gpus_per_run
            params: dict[str, Any] = {"timeout_min": self.options.time_min, "tasks_per_node": self.options.tasks,
                                      "signal_delay_s": self.options.signal_delay_s, "stderr_to_stdout": True}
            if per_run and self.gpus:
                params.update(gpus_per_node=per_run, visible_gpus=tuple(range(free[0] * per_run, (free[0] + 1) * per_run)))
            executor.update_parameters(**params)
            job = executor.submit(_train_job(run, folder, self.options))
            record_jobs(folder, _records([job], [run], "local", f"fastmem-{experiment_id}", folder))
            self.running[run.run_dir] = (job, free[0])
            self.waiting.remove((run, experiment_id))

    def blocked(self) -> list[str]:
        return [run.variant.label for run, _ in self.waiting]


def watch(out: Path, runs: Sequence[PlannedRun], options: ClusterOptions, progress: bool,
          start: Callable[[Mapping[Path, RunStatus]], None] | None = None,
          idle: Callable[[], bool] = lambda: True) -> tuple[dict[Path, RunStatus], dict[Path, float]]:
    """Follow `runs` until none is queued or running (and `idle()`): a line per change, an optional bar of epochs.

    Returns every run's final state and, for those seen running and then done, their minutes."""
    views = {run.run_dir: view_of(run) for run in runs}
    total = len(views)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(v.epochs for v in views.values()), unit="epoch", desc="sweep", leave=False)
    seen: dict[Path, tuple[Any, ...]] = {}
    started: dict[Path, float] = {}
    first_seen: dict[Path, float] = {}
    minutes: dict[Path, float] = {}
    errors = 0
    say = print if bar is None else bar.write
    try:
        while True:
            jobs = latest_jobs(out)
            queue = queue_snapshot(jobs[d.name] for d in views if d.name in jobs)
            statuses = {d: run_status(v, jobs.get(d.name), queue) for d, v in views.items()}
            errors = errors + 1 if queue.error else 0
            if errors > QUEUE_ERRORS_TOLERATED:
                fail(f"Slurm did not answer {errors} times in a row ({queue.error}); the jobs go on: follow them with "
                     f"python -m fastmem.experiments status {out}")
            done = sum(s.state == "done" for s in statuses.values())
            for run_dir, status in statuses.items():
                key = (status.state, status.requeues, status.job.job_id if status.job else None)
                if seen.get(run_dir) == key:
                    continue
                if status.state != "done":  # trained under this watch: timed from its first sight running
                    first_seen.setdefault(run_dir, time.perf_counter())
                    if status.state == "running":
                        started.setdefault(run_dir, time.perf_counter())
                elif run_dir in first_seen:
                    minutes[run_dir] = (time.perf_counter() - started.get(run_dir, first_seen[run_dir])) / 60
                if run_dir in seen or status.state not in ("done", "pending"):
                    say(_transition(status, done, total, minutes.get(run_dir)))
                seen[run_dir] = key
            if bar is not None:
                from fastmem.run.metrics import RunRecords

                bar.n = sum(min(v.epochs, RunRecords.read(d).last_epoch) if statuses[d].state != "failed" else v.epochs
                            for d, v in views.items())
                bar.set_postfix_str(", ".join(f"{n} {state}" for state, n in _counts(statuses).items()))
                bar.refresh()
            if start is not None:
                start(statuses)
            if all(s.ended for s in statuses.values()) and idle():
                return statuses, minutes
            time.sleep(options.poll_s)
    finally:
        if bar is not None:
            bar.close()


def _counts(statuses: Mapping[Path, RunStatus]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status.state] = counts.get(status.state, 0) + 1
    return counts


def _transition(status: RunStatus, done: int, total: int, minutes: float | None) -> str:
    label, job = status.view.label, status.job
    where = f"job {job.job_id}" if job else "no job"
    if status.state == "done":
        took = f" in {minutes:.1f} min" if minutes is not None else ""
        return f"[done {done}/{total}] {label}{took}: {status.metrics}"
    if status.state == "failed":
        return f"[failed] {label}: {status.detail} ({where}, log {job.log if job else '-'})"
    if status.state == "running":
        again = f" (requeued {status.requeues}×, resumed)" if status.requeues else ""
        return f"[running] {label}: {where}{again} → {status.view.run_dir}, log {job.log if job else '-'}"
    if status.state == "queued":
        again = f", requeued {status.requeues}× after a preemption" if status.requeues else ""
        return f"[queued] {label}: {where} {status.detail}{again}".rstrip()
    return f"[{status.state}] {label}: {where} {status.detail}".rstrip()


def run_on_cluster(out: Path, plans: Mapping[str, Sequence[PlannedRun]], options: ClusterOptions, jobs: int,
                   progress: bool) -> tuple[dict[Path, RunStatus], dict[Path, float]] | None:
    """Submit what is neither finished nor queued; with --wait (always for local) follow the runs to their end.

    Returns `watch`'s result, or None when the Slurm jobs were submitted without waiting."""
    unique = unique_runs(plans)
    known = latest_jobs(out)
    queue = queue_snapshot(known[d.name] for d in unique if d.name in known)
    if queue.error is not None:
        fail(f"cannot tell which of this sweep's jobs are still queued ({queue.error}); nothing was submitted")
    todo: list[tuple[PlannedRun, str]] = []
    live: dict[str, JobRecord] = {}
    for run_dir, (run, experiment_id) in unique.items():
        status = run_status(view_of(run), known.get(run_dir.name), queue)
        if status.state == "done":
            print(f"[skip] {run.variant.label}: finished earlier ({status.metrics})", flush=True)
        elif status.state in ("queued", "running") and status.job is not None:
            live[run_dir.name] = status.job
            print(f"[{status.state}] {run.variant.label}: job {status.job.job_id}, submitted earlier and not again",
                  flush=True)
        else:
            todo.append((run, experiment_id))
    runs = [run for run, _ in unique.values()]
    if options.executor == "slurm":
        submit_slurm(out, todo, live, options)
        if not options.wait:
            return None
        return watch(out, runs, options, progress)
    gpus = 0
    if any(run.config.device != "cpu" for run in runs):
        import torch

        gpus = torch.cuda.device_count()
    slots = gpus // max(1, options.gpus_per_run) if gpus else (jobs or os.cpu_count() or 1)
    starter = LocalStarter(out, todo, options, slots, gpus)
    return watch(out, runs, options, progress, start=starter, idle=lambda: starter.idle)
