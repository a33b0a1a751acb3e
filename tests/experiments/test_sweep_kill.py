"""A sweep killed mid-run (SIGKILL to its process group, as a power cut) resumes to the uninterrupted sweep's metrics
without retraining its finished runs (its own file, so that pytest-xdist's loadfile can run it beside the smoke
sweeps of tests/experiments/test_experiments.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from fastmem.run.metrics import read_metrics

TIMING_KEYS = {"images_per_s", "seconds"}


def _metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run_dir / "metrics.jsonl")]


def _sweep_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "fastmem.experiments", "run", "A", "--scale", "smoke", "--out", str(out),
            "--jobs", "1", "--set", "epochs=6", "--no-report"]


def test_killed_sweep_resumes_to_the_same_metrics_without_retraining(tmp_path: Path) -> None:
    env = {**os.environ, "FASTMEM_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    reference = subprocess.run(_sweep_command(tmp_path / "whole"), cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=600)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "cut"
    process = subprocess.Popen(_sweep_command(out), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    runs = out / "runs"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once the first run is finished and the second is under way
        finished = list(runs.glob("*/summary.json")) if runs.exists() else []
        started = [d for d in runs.iterdir() if len(read_metrics(d / "metrics.jsonl")) >= 3] if runs.exists() else []
        if len(finished) == 1 and len(started) == 2:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the sweep never reached its second run")
    os.killpg(process.pid, signal.SIGKILL)  # the sweep and its trainer, mid-run, as a power cut would
    process.wait()
    killed_dir = next(d for d in runs.iterdir() if not (d / "summary.json").exists())
    assert not (out / "A" / "report").exists()
    again = subprocess.run(_sweep_command(out), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "[skip]" in again.stdout and "(resumed)" in again.stdout
    for run_dir in sorted((tmp_path / "whole" / "runs").iterdir()):
        assert _metrics(run_dir) == _metrics(runs / run_dir.name), run_dir.name
    for run_dir in runs.iterdir():  # finished runs were not trained again; the cut one was resumed once
        starts = (run_dir / "train.log").read_text().count("run ")
        assert starts == (2 if run_dir == killed_dir else 1), run_dir.name
