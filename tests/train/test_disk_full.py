"""A full disk (RLIMIT_FSIZE in the child: writes past the limit fail with EFBIG, as ENOSPC would) during a
checkpoint or a metrics write: one line, exit 2, the earlier files byte-identical, no temp file left, and
a resume once there is room again ends where an uninterrupted run ends."""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import QUICK_RUN, REPO, assert_same_weights

from fastmem.run.metrics import read_metrics

RUN = [*QUICK_RUN, "--subset", "128", "--augment", "standard", "--probe-every", "1", "--checkpoint-every", "1"]


def _train(run_dir: Path, epochs: int, *extra: str, file_size_limit: int | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m fastmem.train` as a user runs it; with `file_size_limit`, no file may grow past that many bytes."""
    args = [sys.executable, "-m", "fastmem.train", *RUN, "--epochs", str(epochs), *extra]
    args += ["--resume", str(run_dir)] if (run_dir / "config.json").exists() else ["--out", str(run_dir)]
    preexec: Callable[[], None] | None = None
    if file_size_limit is not None:
        def preexec() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.RLIM_INFINITY))
    env = {**os.environ, "FASTMEM_OFFLINE": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, preexec_fn=preexec)


def _hashes(run_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.iterdir())
            if p.is_file() and not p.name.startswith(".")}  # the lock file holds a pid


def _one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("fastmem: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, precision_flags: list[str]) -> tuple[Path, list[str]]:
    """The uninterrupted 5-epoch run the recovered runs must equal, and its precision flags (each of conftest's)."""
    run_dir = tmp_path_factory.mktemp("disk-full") / "reference"
    result = _train(run_dir, 5, *precision_flags)
    assert result.returncode == 0, result.stderr
    return run_dir, precision_flags


def test_full_disk_at_a_checkpoint_keeps_the_previous_one_and_the_run_resumes(tmp_path: Path, reference: tuple[Path, list[str]]) -> None:
    reference, flags = reference
    run_dir = tmp_path / "run"
    assert _train(run_dir, 4, *flags).returncode == 0
    before = _hashes(run_dir)
    checkpoint_size = (run_dir / "checkpoint.pt").stat().st_size
    metrics_size = (run_dir / "metrics.jsonl").stat().st_size
    assert checkpoint_size > 4 * metrics_size + 4096
    # Room for the metrics and config files, not for a new checkpoint.
    failed = _train(run_dir, 5, *flags, file_size_limit=checkpoint_size // 2)
    assert failed.returncode == 2, failed.stderr
    line = _one_error_line(failed.stderr)
    assert "checkpoint.pt" in line and "disk full" in line, line
    after = _hashes(run_dir)
    assert after["checkpoint.pt"] == before["checkpoint.pt"]  # the previous checkpoint, byte for byte
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    # Room again: the resume redoes epoch 5 from the epoch-4 checkpoint and ends as the uninterrupted run.
    resumed = _train(run_dir, 5, *flags)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(run_dir, reference, 5)
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5]


def test_full_disk_at_a_metrics_write_leaves_the_file_whole_and_the_run_resumes(tmp_path: Path, reference: tuple[Path, list[str]]) -> None:
    reference, flags = reference
    run_dir = tmp_path / "run"
    assert _train(run_dir, 4, *flags).returncode == 0  # enough records that metrics.jsonl outgrows config.json
    before = _hashes(run_dir)
    metrics_size, config_size = (run_dir / "metrics.jsonl").stat().st_size, (run_dir / "config.json").stat().st_size
    assert metrics_size > config_size  # the resume rewrites config.json: it must still fit
    failed = _train(run_dir, 5, *flags, file_size_limit=metrics_size + 16)  # the epoch-5 record does not fit
    assert failed.returncode == 2, failed.stderr
    line = _one_error_line(failed.stderr)
    assert "metrics.jsonl" in line and "disk full" in line, line
    after = _hashes(run_dir)
    assert after.pop("config.json") and before.pop("config.json")  # rewritten at the start: it records --epochs 5
    assert after == before  # no torn record; the checkpoint, labels and every other file unchanged
    resumed = _train(run_dir, 5, *flags)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(run_dir, reference, 5)
    ours = [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in read_metrics(run_dir / "metrics.jsonl")]
    theirs = [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in read_metrics(reference / "metrics.jsonl")]
    assert ours == theirs


def test_a_full_disk_before_the_first_checkpoint_is_one_line_and_leaves_no_temp_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "tiny-limit"
    failed = _train(run_dir, 1, file_size_limit=64)
    assert failed.returncode == 2, (failed.returncode, failed.stderr)
    assert "disk full" in _one_error_line(failed.stderr)
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
