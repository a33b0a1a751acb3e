"""One process per run directory: RUN_DIR/.lock, held by real processes, refused with one line naming the pid."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QUICK_RUN, REPO, run_module

from fastmem.errors import FastmemError
from fastmem.io_utils import is_fastmem_temp
from fastmem.run.config import TrainConfig
from fastmem.run.lock import (
    LOCK_NAME,
    hold_run_lock,
    is_run_lock_held,
    release_run_lock,
    remove_stale_temps,
)

HOLDER = ("import sys, time\n"
          "from fastmem.run.lock import hold_run_lock\n"
          "hold_run_lock(sys.argv[1])\n"
          "print('held', flush=True)\n"
          "time.sleep(120)\n")


def start_holder(directory: Path) -> subprocess.Popen[str]:
    """A separate python process that takes the directory's lock and sleeps (ready once it prints 'held')."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    run_dir = tmp_path / "run"
    process = start_holder(run_dir)
    yield run_dir, process
    if process.poll() is None:
        process.kill()
    process.wait()


def expected_line(run_dir: Path, pid: int, hint: str) -> str:
    return f"fastmem: error: {run_dir} is in use by another fastmem process (pid {pid}); {hint}"


def test_a_held_directory_is_refused_with_the_holders_pid(holder: tuple[Path, subprocess.Popen[str]]) -> None:
    run_dir, process = holder
    assert (run_dir / LOCK_NAME).read_text().strip() == str(process.pid)
    with pytest.raises(FastmemError, match=rf"is in use by another fastmem process \(pid {process.pid}\); "
                                           "wait for it or choose another --out"):
        hold_run_lock(run_dir)
    assert not is_run_lock_held(run_dir)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_the_lock_is_free_once_its_holder_dies(holder: tuple[Path, subprocess.Popen[str]], how: int) -> None:
    run_dir, process = holder
    process.send_signal(how)
    process.wait(timeout=30)
    with hold_run_lock(run_dir) as lock:  # the kernel released the flock with the process
        assert lock.held and is_run_lock_held(run_dir)
        assert (run_dir / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not is_run_lock_held(run_dir)


def test_a_lock_is_reentrant_within_a_process_and_held_until_its_last_handle_goes(tmp_path: Path) -> None:
    run_dir = tmp_path / "new" / "run"  # created on the way
    first = hold_run_lock(run_dir)
    second = hold_run_lock(run_dir)
    first.release()
    first.release()  # idempotent
    assert is_run_lock_held(run_dir)
    second.release()
    assert not is_run_lock_held(run_dir)
    hold_run_lock(run_dir)
    release_run_lock(run_dir)  # drops it whatever handles are out
    release_run_lock(run_dir)
    assert not is_run_lock_held(run_dir)


def test_a_lock_held_here_refuses_another_process(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with hold_run_lock(run_dir):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        code = "import sys\nfrom fastmem.errors import run_cli\nfrom fastmem.run.lock import hold_run_lock\n" \
               "run_cli(lambda argv: hold_run_lock(sys.argv[1]) and 0)\n"
        result = subprocess.run([sys.executable, "-c", code, str(run_dir)], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == expected_line(run_dir, os.getpid(), "wait for it or choose another --out")


def test_removing_stale_temps_needs_the_lock(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="hold_run_lock"):
        remove_stale_temps(tmp_path)


def test_a_second_probe_of_a_held_run_is_refused(holder: tuple[Path, subprocess.Popen[str]]) -> None:
    run_dir, process = holder
    (run_dir / "config.json").write_text(json.dumps(TrainConfig().to_dict()))
    stale = run_dir / "embeddings" / ".h.mean.npy.abcd1234.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"half")
    result = run_module("fastmem.probe", str(run_dir), "--device", "cpu", timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == expected_line(run_dir, process.pid, "wait for it to finish")
    assert stale.exists()  # the holder's files are not touched


def test_a_probe_also_holds_a_cache_folder_outside_its_run(holder: tuple[Path, subprocess.Popen[str]],
                                                          tmp_path: Path) -> None:
    cache_dir, process = holder  # another probe's shared cache
    run_dir = tmp_path / "other-run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(TrainConfig().to_dict()))
    result = run_module("fastmem.probe", str(run_dir), "--device", "cpu", "--cache-dir", str(cache_dir), timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == expected_line(cache_dir, process.pid, "wait for it to finish")
    assert (run_dir / LOCK_NAME).exists()  # it took its run's lock first, and let go of it on the way out


def test_a_second_sweep_on_a_held_output_folder_is_refused(holder: tuple[Path, subprocess.Popen[str]]) -> None:
    out, process = holder
    result = run_module("fastmem.experiments", "run", "A", "--scale", "smoke", "--out", str(out), "--jobs", "1",
                        "--no-report", timeout=180)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == expected_line(out, process.pid, "wait for it or choose another --out")
    assert not (out / "runs").exists() and not (out / "A").exists()  # nothing written




def train_quick(out: Path, *extra: str, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FASTMEM_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "fastmem.train", *QUICK_RUN, "--epochs", "1", "--out", str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, umask=umask)


def test_a_run_directory_gets_0666_less_the_umask(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train_quick(out, umask=0o027)
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "labels.npz", "metrics.jsonl", "checkpoint.pt", "summary.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o640, name
    assert not [p.name for p in out.iterdir() if is_fastmem_temp(p.name)]


def test_the_trainer_holds_its_run_directory_and_clears_stale_temps(holder: tuple[Path, subprocess.Popen[str]]) -> None:
    run_dir, process = holder
    refused = train_quick(run_dir)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip() == expected_line(run_dir, process.pid, "wait for it or choose another --out")
    process.kill()
    process.wait()
    stale, foreign = run_dir / ".checkpoint.pt.k2x9_q0a.tmp", run_dir / "notes.tmp"
    stale.write_bytes(b"half a checkpoint")
    foreign.write_text("mine")
    result = train_quick(run_dir)
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and foreign.exists()
    assert (run_dir / LOCK_NAME).read_text().strip().isdigit()
