"""The executor flags of `python -m fastmem.experiments run` and the checks that a cluster is reachable.

Owns ClusterOptions (what a user sets: executor, Slurm resources, preemption and waiting), their
argparse flags, the parsing of `--time` and `--slurm-extra`, and `check_slurm` / `check_submitit`,
which fail with one line before anything is written or submitted.
"""

from __future__ import annotations

import argparse
import getpass
import math
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastmem.errors import fail

EXECUTORS = ("inline", "local", "slurm")
SLURM_COMMANDS = ("sbatch", "srun", "squeue", "scontrol")
# sbatch options the executor writes itself: --slurm-extra may not set them.
MANAGED_SBATCH = frozenset({"array", "output", "error", "signal", "job-name", "open-mode", "dependency", "ntasks-per-node",
                            "kill-on-invalid-dep", "requeue"})
_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


@dataclass(frozen=True)
class ClusterOptions:
    """Where the runs of a sweep execute and, on Slurm, what each job asks for."""

    executor: str = "inline"
    partition: str | None = None
    gpus_per_run: int = 0
    tasks_per_run: int = 0  # DDP ranks per run, one Slurm task each (0: --gpus-per-run, at least 1)
    cpus_per_run: int = 0  # CPUs per task, also the trainer's threads (0: the cluster's default, the config's threads)
    mem: str | None = None
    time_min: int = 60
    array_parallelism: int = 0
    account: str | None = None
    qos: str | None = None
    extra: Mapping[str, str | bool] = field(default_factory=dict)
    signal_delay_s: int = 120
    max_requeues: int = 10
    wait: bool = False
    poll_s: float = 10.0

    @property
    def tasks(self) -> int:
        """Ranks (Slurm tasks) per run: one per GPU unless --tasks-per-run says otherwise."""
        return self.tasks_per_run or max(1, self.gpus_per_run)

    @property
    def waits(self) -> bool:
        """Whether `run` blocks until the runs end (always for inline and local: they run under this process)."""
        return self.wait or self.executor != "slurm"


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """The executor flags of `run` (defaults shown by --help)."""
    group = parser.add_argument_group("executors", "where the runs execute: here one by one (inline), as submitit jobs "
                                                   "on this machine (local) or as Slurm jobs (slurm)")
    add = group.add_argument
    add("--executor", default="inline", choices=EXECUTORS, help="inline: this process starts the trainers; local: "
        "submitit's LocalExecutor; slurm: one job-array task per pending run through submitit")
    add("--wait", action="store_true", help="slurm: block with a progress bar until every job ends, then write the "
        "reports (inline and local always wait)")
    add("--partition", default=None, help="slurm: partition of the jobs")
    add("--gpus-per-run", type=int, default=0, help="GPUs per run; N > 1 runs DDP with one Slurm task per GPU")
    add("--tasks-per-run", type=int, default=0, help="DDP ranks per run, one task each (0 = --gpus-per-run, at least "
        "1; 2 on CPU runs gloo)")
    add("--cpus-per-run", type=int, default=0, help="CPUs per task, also the trainer's threads (0 = the cluster's "
        "default and the scale's threads)")
    add("--mem", default=None, help="slurm: memory per node, in sbatch's --mem syntax (e.g. 32G)")
    add("--time", default="60", help="wall-clock limit per job: minutes or Slurm's [D-]HH:MM[:SS]; a run that needs "
        "longer is checkpointed and requeued at the limit")
    add("--array-parallelism", type=int, default=0, help="slurm: at most this many runs at once (0 = the "
        "cluster's limit)")
    add("--account", default=None, help="slurm: account to charge")
    add("--qos", default=None, help="slurm: quality of service")
    add("--slurm-extra", action="append", default=[], metavar="KEY=VALUE", help="slurm: any other sbatch option "
        "(repeatable), e.g. --slurm-extra constraint=a100; KEY alone for a flag")
    add("--signal-delay", type=int, default=120, metavar="SECONDS", help="jobs get SIGUSR1 this long before their "
        "time limit (--signal=USR1@SECONDS): the trainer checkpoints at the step and the job is requeued")
    add("--max-requeues", type=int, default=10, help="requeues per job (preemptions and time limits) before it "
        "ends as failed; running the sweep again resubmits it")
    add("--poll", type=float, default=10.0, metavar="SECONDS", help="how often --wait and the local executor look "
        "at the jobs")


def parse_time(text: str) -> int:
    """`--time` → whole minutes: `90`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS` (Slurm's formats)."""
    match = _TIME.match(text.strip())
    if not match:
        fail(f"--time {text!r}: expected minutes or [D-]HH:MM[:SS] (Slurm's formats)")
    days, a, b, c = (int(g) if g is not None else None for g in match.group("days", "a", "b", "c"))
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # minutes
        seconds = a * 60
    if seconds <= 0:
        fail(f"--time {text!r}: expected a positive time")
    return math.ceil(seconds / 60)


def parse_extra(pairs: Sequence[str]) -> dict[str, str | bool]:
    """`--slurm-extra KEY=VALUE` (or KEY for a flag) → sbatch options; the executor's own options are refused."""
    extra: dict[str, str | bool] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().lstrip("-").replace("_", "-")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
            fail(f"--slurm-extra {pair!r}: expected KEY=VALUE with an sbatch option name (e.g. constraint=a100)")
        if key in MANAGED_SBATCH:
            fail(f"--slurm-extra {pair!r}: the executor sets --{key} itself")
        extra[key] = value if sep else True
    return extra


def options_from_args(args: argparse.Namespace) -> ClusterOptions:
    """The flags of `run` as ClusterOptions; slurm-only flags with another executor, and bad numbers, are errors."""
    slurm_only = {"--partition": args.partition, "--mem": args.mem, "--array-parallelism": args.array_parallelism,
                  "--account": args.account, "--qos": args.qos, "--slurm-extra": args.slurm_extra}
    if args.executor != "slurm":
        given = [flag for flag, value in slurm_only.items() if value]
        if given:
            fail(f"{', '.join(given)}: only with --executor slurm (this run uses --executor {args.executor})")
    for flag, value in (("--gpus-per-run", args.gpus_per_run), ("--tasks-per-run", args.tasks_per_run),
                        ("--cpus-per-run", args.cpus_per_run), ("--array-parallelism", args.array_parallelism),
                        ("--max-requeues", args.max_requeues), ("--signal-delay", args.signal_delay)):
        if value < 0:
            fail(f"{flag} {value}: expected a number >= 0")
    if args.executor == "inline" and (args.gpus_per_run or args.tasks_per_run or args.cpus_per_run):
        fail("--gpus-per-run, --tasks-per-run and --cpus-per-run apply to --executor local or slurm "
             "(inline runs one trainer per GPU, --jobs side by side on a CPU)")
    if not args.poll > 0:
        fail(f"--poll {args.poll}: expected a positive number of seconds")
    return ClusterOptions(
        executor=args.executor, partition=args.partition, gpus_per_run=args.gpus_per_run,
        tasks_per_run=args.tasks_per_run, cpus_per_run=args.cpus_per_run, mem=args.mem, time_min=parse_time(args.time),
        array_parallelism=args.array_parallelism, account=args.account, qos=args.qos,
        extra=parse_extra(args.slurm_extra), signal_delay_s=args.signal_delay, max_requeues=args.max_requeues,
        wait=args.wait, poll_s=args.poll)


PREEMPT_SIGNAL = "USR1"  # what fastmem.train checkpoints on (SIGUSR2, submitit's default, would kill it)


def load_submitit(executor: str = "slurm") -> Any:
    """submitit, its preemption signal set to SIGUSR1 (submitit reads it once, when first imported); one line naming
    the install when it is missing."""
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = PREEMPT_SIGNAL
    try:
        import submitit
        from submitit.core.job_environment import JobEnvironment
    except ImportError:
        fail(f"--executor {executor} needs submitit: pip install -e .[cluster] (or pip install submitit)")
    if JobEnvironment.USR_SIG != PREEMPT_SIGNAL:
        fail(f"submitit was imported with SUBMITIT_PREEMPT_SIGNAL={JobEnvironment.USR_SIG}; fastmem's trainer "
             f"checkpoints on SIGUSR1: unset it")
    return submitit


def check_submitit(executor: str) -> None:
    """submitit must be importable for the local and slurm executors (one line naming the install otherwise)."""
    load_submitit(executor)


def check_slurm() -> None:
    """Slurm's commands must be on PATH and its controller must answer, else one line naming what is missing."""
    check_submitit("slurm")
    missing = [name for name in SLURM_COMMANDS if shutil.which(name) is None]
    if missing:
        fail(f"--executor slurm: no Slurm here: {', '.join(missing)} not found on PATH (run on a login node of "
             f"the cluster, or load its slurm module); nothing was submitted")
    try:
        result = subprocess.run(["squeue", "--noheader", "--user", getpass.getuser(), "--format", "%i"],
                                capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        fail("--executor slurm: the Slurm controller did not answer squeue within 60 s; nothing was submitted")
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1].removeprefix("squeue: ")
        fail(f"--executor slurm: the Slurm controller is not reachable (squeue: {reason}); nothing was submitted")
