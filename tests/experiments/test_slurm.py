"""Sweeps through a real Slurm (tests/slurm_cluster.py: munged, slurmctld, slurmd on this machine) and submitit.

A smoke sweep of experiment K (2 runs, 3 epochs) through `--executor slurm`, one of its runs preempted
mid-training with `scancel --signal=USR1`, ends with the inline runner's metrics and report; a failing
run shows as failed with its log while the other finishes, and only it is resubmitted; no Slurm is one
line, and so is a controller that does not answer; the local executor trains the same sweep; a 2-task
gloo run under srun equals the torchrun run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, assert_same_weights, run_module
from slurm_cluster import PACKAGES, SlurmCluster, missing_programs

from fastmem.experiments import EXPERIMENTS, plan_experiment
from fastmem.experiments.cluster.ledger import LEDGER_NAME, read_ledger, slurm_folder
from fastmem.experiments.cluster.status import status_report
from fastmem.run.metrics import read_metrics

pytestmark = pytest.mark.slurm

SWEEP = ["K", "--scale", "smoke", "--set", "epochs=3"]
FAST = ["--poll", "0.3"]
TIMING_KEYS = {"images_per_s", "seconds"}


def _metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run_dir / "metrics.jsonl")]


def _same_runs(reference: Path, out: Path) -> None:
    names = sorted(p.name for p in (reference / "runs").iterdir())
    assert names == sorted(p.name for p in (out / "runs").iterdir())
    for name in names:
        assert _metrics(reference / "runs" / name) == _metrics(out / "runs" / name), name


def _experiments(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return run_module("fastmem.experiments", *args, timeout=timeout)


@pytest.fixture(scope="module")
def inline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sweep through the inline runner: the reference every executor must reproduce."""
    out = tmp_path_factory.mktemp("inline")
    result = _experiments("run", *SWEEP, "--out", str(out), "--jobs", "2")
    assert result.returncode == 0, result.stderr
    return out


def _wait_for(condition, timeout_s: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_slurm_sweep_with_a_preempted_run_ends_with_the_inline_report(
        slurm_cluster: SlurmCluster, inline: Path, tmp_path: Path) -> None:
    out = tmp_path / "slurm"
    started = time.perf_counter()
    submitted = _experiments("run", *SWEEP, "--out", str(out), "--executor", "slurm")
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.count("[submitted]") == 2 and "watch: python -m fastmem.experiments status" in submitted.stdout
    jobs = read_ledger(slurm_folder(out, "K"))
    run_name, job = next((name, j) for name, j in jobs.items() if j.label == "clean labels, full aug")
    metrics = out / "runs" / run_name / "metrics.jsonl"
    _wait_for(lambda: any(r.get("epoch") == 1 for r in read_metrics(metrics, warn=False)), what="epoch 1's record")
    subprocess.run(["scancel", "--signal=USR1", job.job_id], check=True, env=slurm_cluster.env(), timeout=30)
    seen: list[str] = []

    def requeued() -> bool:
        seen.append(status_report(out))
        return "requeued 1×" in next(line for line in seen[-1].splitlines() if "clean labels, full aug" in line)

    _wait_for(requeued, what="the requeue in status")
    print("status during the preemption:\n" + seen[-1])
    # A second `run` while the jobs are queued or running submits nothing; --wait follows them and writes the report.
    collected = _experiments("run", *SWEEP, "--out", str(out), "--executor", "slurm", "--wait", *FAST)
    assert collected.returncode == 0, collected.stderr
    assert "[submitted]" not in collected.stdout and "submitted earlier and not again" in collected.stdout
    print(f"slurm sweep with one preemption: {time.perf_counter() - started:.1f} s")
    _same_runs(inline, out)
    assert (out / "K" / "report" / "report.md").read_text() == (inline / "K" / "report" / "report.md").read_text()
    log = Path(job.log).read_text()
    assert "fastmem: interrupted at epoch" in log and "resuming 'clean labels, full aug'" in log, log
    final = _experiments("status", str(out))
    assert final.returncode == 0, final.stderr
    line = next(line for line in final.stdout.splitlines() if "clean labels, full aug" in line)
    assert " done " in line and f"job {job.job_id}, requeued 1×" in line and f"log {job.log}" in line, line


def test_a_failing_run_shows_failed_with_its_log_and_only_it_is_resubmitted(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "fail"
    bad = plan_experiment(EXPERIMENTS["K"], "smoke", out, {"epochs": 3})[1]
    (bad.run_dir / "metrics.jsonl").mkdir(parents=True)  # an injected fault: the trainer cannot write its metrics
    result = _experiments("run", *SWEEP, "--out", str(out), "--executor", "slurm", "--wait", "--no-report", *FAST)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("fastmem: error:") == 1 and "1 of 2 runs did not finish" in result.stderr, result.stderr
    status = _experiments("status", str(out), "K")
    lines = {label: next(line for line in status.stdout.splitlines() if label in line)
             for label in ("clean labels, full aug", "clean labels, no aug")}
    job = read_ledger(slurm_folder(out, "K"))[bad.run_dir.name]
    assert " done " in lines["clean labels, full aug"], status.stdout
    failed = lines["clean labels, no aug"]
    assert " failed " in failed and f"log {job.log}" in failed and "metrics.jsonl: cannot read metrics" in failed, failed
    assert "cannot read metrics" in Path(job.log).read_text()
    (bad.run_dir / "metrics.jsonl").rmdir()
    again = _experiments("run", *SWEEP, "--out", str(out), "--executor", "slurm", "--no-report")
    assert again.returncode == 0, again.stderr
    assert "[skip] clean labels, full aug: finished earlier" in again.stdout
    assert again.stdout.count("[submitted]") == 1 and "[submitted] clean labels, no aug" in again.stdout, again.stdout
    resubmitted = read_ledger(slurm_folder(out, "K"))
    assert resubmitted[bad.run_dir.name].job_id != job.job_id and len(resubmitted) == 2
    subprocess.run(["scancel", resubmitted[bad.run_dir.name].job_id], env=slurm_cluster.env(), timeout=30)
    slurm_cluster.wait_idle()


def test_no_reachable_slurm_is_one_line_and_submits_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent), "FASTMEM_OFFLINE": "1"}  # python, no Slurm
    result = subprocess.run([sys.executable, "-m", "fastmem.experiments", "run", *SWEEP, "--out", str(tmp_path / "out"),
                             "--executor", "slurm"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no Slurm here: sbatch, srun, squeue, scontrol not found on PATH" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_an_unreachable_controller_is_one_line_and_submits_nothing(tmp_path: Path) -> None:
    """Slurm's commands are there, its controller is not: a configuration whose daemons were never started."""
    missing = missing_programs()
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} not found): apt-get install {PACKAGES}")
    down = SlurmCluster(tmp_path / "down")
    down.write_files()
    down.conf.write_text(down.conf.read_text().replace("MessageTimeout=10", "MessageTimeout=1"))
    result = subprocess.run([sys.executable, "-m", "fastmem.experiments", "run", *SWEEP, "--out", str(tmp_path / "out"),
                             "--executor", "slurm"], cwd=REPO, env={**down.env(), "FASTMEM_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "the Slurm controller is not reachable (squeue: " in result.stderr, result.stderr
    assert "nothing was submitted" in result.stderr and not (tmp_path / "out").exists()


def test_the_local_executor_trains_the_same_sweep(inline: Path, tmp_path: Path) -> None:
    out = tmp_path / "local"
    started = time.perf_counter()
    result = _experiments("run", *SWEEP, "--out", str(out), "--executor", "local", "--jobs", "2", "--no-report", *FAST)
    assert result.returncode == 0, result.stderr
    print(f"local executor sweep: {time.perf_counter() - started:.1f} s")
    _same_runs(inline, out)
    jobs = read_ledger(slurm_folder(out, "K"))
    assert {j.executor for j in jobs.values()} == {"local"} and all(Path(j.log).exists() for j in jobs.values())


def test_a_two_task_gloo_run_under_srun_equals_the_torchrun_run(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """--tasks-per-run 2: one Slurm task per rank (submitit's TorchDistributedEnvironment), against torchrun."""
    from fastmem.experiments.cluster.options import ClusterOptions
    from fastmem.experiments.cluster.submit import submit_slurm, watch
    from fastmem.experiments.sweep import train_command

    out = tmp_path / "ddp"
    run = plan_experiment(EXPERIMENTS["K"], "smoke", out, {"epochs": 2, "checkpoint_every": 1})[0]
    options = ClusterOptions(executor="slurm", tasks_per_run=2, cpus_per_run=1, wait=True, poll_s=0.3)
    submit_slurm(out, [(run, "K")], {}, options)
    statuses, _ = watch(out, [run], options, progress=False)
    assert statuses[run.run_dir].state == "done", statuses[run.run_dir].line()
    reference = tmp_path / "torchrun"
    command = train_command(run, 1, resume=False)
    command[command.index("--out") + 1] = str(reference)
    env = {**os.environ, "FASTMEM_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               *command[1:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr[-2000:]
    assert json.loads((run.run_dir / "summary.json").read_text())["world_size"] == 2
    assert _metrics(run.run_dir) == _metrics(reference)
    assert_same_weights(run.run_dir, reference, 2)
    log = Path(read_ledger(slurm_folder(out, "K"))[run.run_dir.name].log).read_text()
    assert "rank 0/2" in log and (slurm_folder(out, "K") / LEDGER_NAME).exists()
