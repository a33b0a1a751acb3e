"""What one job runs: the trainer of one planned run as a subprocess, checkpointed and requeued when preempted.

TrainJob is a submitit Checkpointable, pickled at submission and called in the job (one call per Slurm
task). Rank 0 decides once per attempt whether the run starts or resumes (config.json there or not) and
writes that, with the attempt's number and host, to <job>_fastmem.json; further ranks (DDP: one task
per GPU, MASTER_ADDR/RANK/WORLD_SIZE from submitit's TorchDistributedEnvironment, the torchrun
contract) read it, so every rank runs the same command. The trainer writes to the job's log.

Preemption and time limits: Slurm sends SIGUSR1 (`--signal=USR1@SECONDS`; SUBMITIT_PREEMPT_SIGNAL=USR1)
to every process of the job step: the trainer finishes its step, checkpoints and exits (138), while
submitit's handler calls `checkpoint` here, which waits for the trainer to exit and returns this job
with one more requeue counted; submitit then requeues it (`scontrol requeue`) and the next attempt
resumes the run exactly. Past `max_requeues` it returns None: the job ends as failed, the checkpoint
stays, and running the sweep again resubmits it. submitit's local executor signals only its own task,
so there `checkpoint` passes the signal on to the trainer. Under DDP the trainer's ranks keep the
signal's default effect and the run resumes from its last periodic checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import submitit

from fastmem.experiments.cluster.ledger import attempt_path, log_error_line
from fastmem.experiments.sweep import PlannedRun, train_command
from fastmem.io_utils import write_json_atomic

# A trainer's exit on a stop signal: its own checkpointed exit (128 + n), or the signal's default effect.
STOP_CODES = frozenset(code for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT) for code in (128 + sig, -sig))
RANK_WAIT_S = 300.0  # how long ranks > 0 wait for rank 0's decision


class TrainJob(submitit.helpers.Checkpointable):
    """Train (or resume) one planned run inside a job; requeued on preemption up to `max_requeues` times."""

    def __init__(self, run: PlannedRun, folder: str, threads: int, grace_s: float, max_requeues: int,
                 requeues: int = 0) -> None:
        self.run, self.folder, self.threads = run, folder, threads
        self.grace_s, self.max_requeues, self.requeues = grace_s, max_requeues, requeues
        self._process: subprocess.Popen[bytes] | None = None
        self._returncode: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_process", "_returncode")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _process=None, _returncode=None)

    # -- the job's record of itself -------------------------------------------------------------------------
    def _attempt(self) -> str:
        """This attempt's name: Slurm's restart count (requeues it saw) and submitit's (checkpointed requeues)."""
        return f"{os.environ.get('SLURM_RESTART_COUNT', '0')}.{self.requeues}"

    def _write(self, env: submitit.JobEnvironment, **fields: Any) -> None:
        path = attempt_path(Path(self.folder), env.job_id)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {}
        record.update(fields, run_dir=str(self.run.run_dir), label=self.run.variant.label, job_id=env.job_id,
                      requeues=max(int(record.get("requeues", 0)), int(fields.get("requeues", self.requeues))),
                      restarts=int(os.environ.get("SLURM_RESTART_COUNT", "0")), updated=time.time())
        write_json_atomic(path, record)

    def _rank0_decision(self, env: submitit.JobEnvironment) -> dict[str, Any]:
        path, attempt = attempt_path(Path(self.folder), env.job_id), self._attempt()
        deadline = time.monotonic() + RANK_WAIT_S
        while time.monotonic() < deadline:
            try:
                record = json.loads(path.read_text())
                if record.get("attempt") == attempt:
                    return record
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"rank {env.global_rank}: rank 0 wrote no start record to {path} in {RANK_WAIT_S:g} s")

    # -- the run --------------------------------------------------------------------------------------------
    def __call__(self) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # DDP, one task per rank: the torchrun contract's variables from Slurm's
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        run_dir, label = self.run.run_dir, self.run.variant.label
        if env.global_rank == 0:
            finished, resume = (run_dir / "summary.json").exists(), (run_dir / "config.json").exists()
            self._write(env, attempt=self._attempt(), state="done" if finished else "running", resume=resume,
                        host=socket.gethostname(), started=time.time(), returncode=None, error="",
                        log=str(env.paths.stdout))
        else:
            record = self._rank0_decision(env)
            finished, resume = record["state"] == "done", bool(record["resume"])
        if finished:
            print(f"fastmem: {label}: {run_dir} is finished already; nothing to train", flush=True)
            return {"run_dir": str(run_dir), "state": "done"}
        run_dir.mkdir(parents=True, exist_ok=True)
        command = train_command(self.run, self.threads or self.run.config.threads, resume=resume)  # resume: same threads
        print(f"fastmem: job {env.job_id} rank {env.global_rank}/{env.num_tasks} on {socket.gethostname()}: "
              f"{'resuming' if resume else 'starting'} {label!r} (attempt {self._attempt()}) → {run_dir}", flush=True)
        code = self._train(command)
        if code in STOP_CODES:
            time.sleep(2.0)  # a checkpoint request on its way to this process requeues the job from its handler
        if code == 0:
            if env.global_rank == 0:
                self._write(env, state="done", returncode=0, ended=time.time())
            return {"run_dir": str(run_dir), "state": "done"}
        reason = self._failure(code, env)
        if env.global_rank == 0:
            self._write(env, state="failed", returncode=code, error=reason, ended=time.time())
        print(f"fastmem: error: {reason}", file=sys.stderr, flush=True)
        raise RuntimeError(reason)

    def _failure(self, code: int, env: submitit.JobEnvironment) -> str:
        if code in STOP_CODES:
            name = signal.Signals(abs(code) if code < 0 else code - 128).name
            return (f"the trainer stopped on {name} (cancelled, or a time limit without a warning signal); "
                    f"run the sweep again to resume it")
        cause = log_error_line(env.paths.stdout)
        return f"the trainer exited with status {code}" + (f": {cause}" if cause else "")

    def _train(self, command: list[str]) -> int:
        """Run the trainer to its end; the main thread only sleeps, so a signal handler may wait on it too."""
        self._returncode = None
        self._process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        threading.Thread(target=self._reap, args=(self._process,), daemon=True).start()
        while self._returncode is None:
            time.sleep(0.2)
        return self._returncode

    def _reap(self, process: subprocess.Popen[bytes]) -> None:
        self._returncode = process.wait()

    # -- preemption -----------------------------------------------------------------------------------------
    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit on SIGUSR1 (rank 0): let the trainer checkpoint and exit, then requeue this run."""
        env = submitit.JobEnvironment()
        process = self._process
        if process is not None and self._returncode is None and env.cluster != "slurm":
            process.send_signal(signal.SIGUSR1)  # the local executor signalled this task only
        deadline = time.monotonic() + self.grace_s
        while process is not None and self._returncode is None and time.monotonic() < deadline:
            time.sleep(0.2)
        trainer = "still running" if process is not None and self._returncode is None else \
            f"exited with {self._returncode}" if process is not None else "not started"
        if self.requeues >= self.max_requeues:
            reason = (f"not requeued: --max-requeues {self.max_requeues} reached (the trainer {trainer}); run the "
                      f"sweep again to resubmit it, it resumes from its last checkpoint")
            self._write(env, state="failed", error=reason, ended=time.time())
            print(f"fastmem: error: {reason}", file=sys.stderr, flush=True)
            return None
        self._write(env, state="requeued", requeues=self.requeues + 1)
        print(f"fastmem: preempted; the trainer {trainer}; requeued ({self.requeues + 1} of at most "
              f"{self.max_requeues})", flush=True)
        again = TrainJob(self.run, self.folder, self.threads, self.grace_s, self.max_requeues, self.requeues + 1)
        return submitit.helpers.DelayedSubmission(again)
