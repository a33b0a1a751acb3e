"""DDP faults: a failure on any one of 2 gloo ranks ends every rank within 60 s, the cause printed once, no hang.

Real processes throughout. Each rank is its own `python -m fastmem.train` with the variables torchrun
would set (no agent to tear the survivor down: it must end by itself), resuming a finished 1-epoch run.
Faults, on rank 0 and on rank 1 in turn: a user error seen by one rank only (its $FASTMEM_DATA, as on
a node with its own copy of the data, holds a truncated IDX file) and a SIGKILL while its peer waits in
a collective. Under torchrun, a SIGTERM to the launcher ends both workers and leaves the checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_module

from fastmem.data.idx import write_idx_images, write_idx_labels
from fastmem.errors import FastmemError
from fastmem.run.checkpoint import load_checkpoint

WORLD = 2
ENDS_WITHIN_S = 60
# Batches of 8 (4 a rank): 16 steps an epoch, so a fault at the start of epoch 2 lands well before its checkpoint.
RUN = ["--dataset", "fashion-mnist", "--subset", "128", "--probe-subset", "64", "--batch-size", "8",
       "--model", "small_cnn", "--width", "0.25", "--bottleneck-dim", "64", "--probe-every", "-1",
       "--checkpoint-every", "1", "--device", "cpu", "--threads", "1", "--progress", "false"]
FILES = ("checkpoint.pt", "config.json", "labels.npz", "metrics.jsonl", "summary.json")
TRUNCATED = "train-images-idx3-ubyte"


def _write_fashion_mnist(directory: Path, count: int = 256) -> None:
    """A small dataset in Fashion-MNIST's own IDX format (both splits)."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        write_idx_images(directory / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28), np.uint8))
        write_idx_labels(directory / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, count, np.uint8))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished 1-epoch run (one process), the data it was trained on, and a copy with a truncated file."""
    root = tmp_path_factory.mktemp("ddp-faults")
    good, bad = root / "data", root / "bad-data"
    _write_fashion_mnist(good)
    shutil.copytree(good, bad)
    (bad / TRUNCATED).write_bytes((bad / TRUNCATED).read_bytes()[:1000])
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FASTMEM_DATA", str(good))
        result = run_module("fastmem.train", *RUN, "--epochs", "1", "--out", str(root / "run"))
    assert result.returncode == 0, result.stderr
    return {"run": root / "run", "data": good, "bad": bad}


def _copy_run(finished: dict[str, Path], tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    run = tmp_path / "run"
    shutil.copytree(finished["run"], run)
    return run, {name: (run / name).read_bytes() for name in FILES}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "FASTMEM_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def _start_ranks(run: Path, data_of_rank: list[Path], logs: Path, epochs_of_rank: tuple[str, ...] = ("3", "3"),
                 **extra_env: str) -> list[subprocess.Popen[bytes]]:
    """Both ranks resume `run` to 3 epochs, each with its own data directory, as torchrun's workers would."""
    port, ranks = str(_free_port()), []
    for rank, (data, epochs) in enumerate(zip(data_of_rank, epochs_of_rank)):
        env = _environment(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=port, FASTMEM_DATA=str(data), **extra_env)
        ranks.append(subprocess.Popen(
            [sys.executable, "-m", "fastmem.train", "--resume", str(run), "--epochs", epochs, "--progress", "false"],
            cwd=REPO, env=env, stdout=open(logs / f"rank{rank}.out", "wb"), stderr=open(logs / f"rank{rank}.err", "wb")))
    return ranks


def _wait_for(condition, what: str, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


def _wait_until_blocked(pid: int) -> None:
    """Until `pid` uses no CPU for 0.4 s: it waits in a collective for its stopped peer."""
    still, ticks, deadline = 0, _cpu_ticks(pid), time.monotonic() + 30
    while still < 4:
        assert time.monotonic() < deadline, f"pid {pid} never blocked"
        time.sleep(0.1)
        now = _cpu_ticks(pid)
        still, ticks = (still + 1 if now == ticks else 0), now


def _all_end(processes: list[subprocess.Popen[bytes]], since: float) -> list[float]:
    """Seconds from `since` until each process ended; any still running after the limit is killed, then fails."""
    ended: list[float | None] = [None] * len(processes)
    while None in ended and time.monotonic() - since < ENDS_WITHIN_S:
        for index, process in enumerate(processes):
            if ended[index] is None and process.poll() is not None:
                ended[index] = time.monotonic() - since
        time.sleep(0.02)
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert None not in ended, f"still running {ENDS_WITHIN_S} s after the fault: {ended}"
    return ended  # type: ignore[return-value]


def _stderr_lines(logs: Path, rank: int) -> list[str]:
    return (logs / f"rank{rank}.err").read_text().splitlines()


def _assert_survivor_said_one_line(logs: Path, survivor: int) -> None:
    lines = _stderr_lines(logs, survivor)
    assert len(lines) == 1 and lines[0].startswith(
        f"fastmem: error: rank {survivor} of {WORLD} stopped: a collective failed ("), lines
    assert "another rank failed, was killed or hangs, and its own output names the cause" in lines[0]


@pytest.mark.parametrize("faulty", [0, 1])
def test_a_user_error_on_one_rank_ends_both_with_the_message_once(
        finished: dict[str, Path], tmp_path: Path, faulty: int) -> None:
    run, before = _copy_run(finished, tmp_path)
    data = [finished["bad"] if rank == faulty else finished["data"] for rank in range(WORLD)]
    ranks = _start_ranks(run, data, tmp_path)
    _wait_for(lambda: ranks[faulty].poll() is not None, "the faulty rank never failed")
    _all_end(ranks, since=time.monotonic())

    assert ranks[faulty].returncode == 2 and ranks[1 - faulty].returncode != 0
    message = (f"fastmem: error: {finished['bad'] / TRUNCATED}: truncated IDX file: header says (256, 28, 28) = "
               f"200704 bytes, found 984")
    assert _stderr_lines(tmp_path, faulty) == [message]
    _assert_survivor_said_one_line(tmp_path, 1 - faulty)
    assert {name: (run / name).read_bytes() for name in FILES} == before  # nothing of the run rewritten


@pytest.mark.parametrize("faulty", [0, 1])
def test_a_rank_killed_mid_epoch_ends_its_peer_and_leaves_the_checkpoint(
        finished: dict[str, Path], tmp_path: Path, faulty: int) -> None:
    run, before = _copy_run(finished, tmp_path)
    ranks = _start_ranks(run, [finished["data"]] * WORLD, tmp_path)
    _wait_for(lambda: "2 ranks × batch 4" in (tmp_path / "rank0.out").read_text(), "training never started")
    victim, survivor = ranks[faulty], ranks[1 - faulty]
    victim.send_signal(signal.SIGSTOP)  # freeze it, let the peer run into the next collective, then kill it there
    _wait_until_blocked(survivor.pid)
    checkpoint = (run / "checkpoint.pt").read_bytes()
    victim.send_signal(signal.SIGKILL)
    _all_end(ranks, since=time.monotonic())

    assert victim.returncode == -signal.SIGKILL and survivor.returncode == 2
    _assert_survivor_said_one_line(tmp_path, 1 - faulty)
    assert _stderr_lines(tmp_path, faulty) == []
    assert (run / "checkpoint.pt").read_bytes() == checkpoint
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    assert (run / "summary.json").read_bytes() == before["summary.json"]  # the 1-epoch run's: this one never ended


def test_a_rank_that_never_joins_ends_its_peer_after_the_bounded_wait(
        finished: dict[str, Path], tmp_path: Path) -> None:
    """Rank 1 fails before joining (a bad flag on its node): rank 0 waits $FASTMEM_DDP_TIMEOUT_S, not gloo's 30 min."""
    run, before = _copy_run(finished, tmp_path)
    ranks = _start_ranks(run, [finished["data"]] * WORLD, tmp_path, ("3", "three"), FASTMEM_DDP_TIMEOUT_S="3")
    _wait_for(lambda: ranks[1].poll() is not None, "rank 1 never failed")
    _all_end(ranks, since=time.monotonic())

    assert ranks[1].returncode == 2 and ranks[0].returncode == 2
    assert _stderr_lines(tmp_path, 1)[-1] == "python -m fastmem.train: error: argument --epochs: invalid int value: 'three'"
    lines = _stderr_lines(tmp_path, 0)
    assert len(lines) == 1 and lines[0].startswith("fastmem: error: rank 0 of 2 stopped: the process group never formed ("), lines
    assert lines[0].endswith("(ranks wait 3 s for each other: $FASTMEM_DDP_TIMEOUT_S)")
    assert {name: (run / name).read_bytes() for name in FILES} == before


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan"])
def test_a_bad_wait_bound_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from fastmem.distributed import process_group_timeout

    monkeypatch.setenv("FASTMEM_DDP_TIMEOUT_S", value)
    with pytest.raises(FastmemError, match=rf"^\$FASTMEM_DDP_TIMEOUT_S='{value}': expected a positive number of seconds$"):
        process_group_timeout()
    monkeypatch.setenv("FASTMEM_DDP_TIMEOUT_S", "2.5")
    assert process_group_timeout().total_seconds() == 2.5


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _gone(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_sigterm_to_the_torchrun_launcher_ends_every_rank_and_leaves_the_checkpoint(
        finished: dict[str, Path], tmp_path: Path) -> None:
    run, _ = _copy_run(finished, tmp_path)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               "-m", "fastmem.train", "--resume", str(run), "--epochs", "3", "--progress", "false"]
    launcher = subprocess.Popen(command, cwd=REPO, env=_environment(FASTMEM_DATA=str(finished["data"])),
                                stdout=open(tmp_path / "out", "wb"), stderr=open(tmp_path / "err", "wb"))
    _wait_for(lambda: "2 ranks × batch 4" in (tmp_path / "out").read_text(), "training never started")
    workers = _children(launcher.pid)
    checkpoint = (run / "checkpoint.pt").read_bytes()
    launcher.send_signal(signal.SIGTERM)
    _all_end([launcher], since=time.monotonic())

    assert len(workers) == WORLD and all(_gone(pid) for pid in workers)  # no orphan rank
    assert launcher.returncode != 0
    assert "Traceback" not in (tmp_path / "out").read_text()
    assert (run / "checkpoint.pt").read_bytes() == checkpoint
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
