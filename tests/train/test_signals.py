"""Stop signals: the trainer finishes its step, checkpoints mid-epoch, exits 128 + signal; a resume matches the whole run.

Through real processes: a run is signalled early in epoch 2, resumed to the end, and compared bit for bit
(weights, optimizer state, metrics records but their timing keys) with an uninterrupted run of the config.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_same_weights, run_module

from fastmem.run.checkpoint import load_checkpoint, save_checkpoint
from fastmem.run.metrics import read_metrics
from fastmem.train.interrupt import StopSignals

EPOCHS = 3
# 1024 images in batches of 32: 32 steps an epoch, so a signal sent as epoch 1 ends lands early in epoch 2.
# Mixup draws by (seed, epoch, step): a resume that numbered its steps wrongly would train other batches.
RUN = ["--dataset", "fashion-mnist", "--subset", "1024", "--probe-subset", "200", "--batch-size", "32",
       "--model", "small_cnn", "--width", "0.25", "--bottleneck-dim", "64", "--mixup", "0.5", "--probe-every", "-1",
       "--checkpoint-every", "10", "--progress", "false", "--device", "cpu", "--threads", "1", "--epochs", str(EPOCHS),
       "--precision", "fp32"]
TIMING_KEYS = {"images_per_s", "seconds"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, precision_flags: list[str]) -> tuple[Path, list[str]]:
    """The whole run, in each of conftest's precisions, and those precision flags."""
    out = tmp_path_factory.mktemp("whole") / "run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XDG_CACHE_HOME", str(out.parent / "xdg-cache"))
        result = run_module("fastmem.train", *RUN, *precision_flags, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, precision_flags


def _signal_during_epoch_2(out: Path, signum: int, *flags: str) -> subprocess.CompletedProcess[str]:
    """Start a run, send `signum` as soon as epoch 1's record is written, wait for the run to exit."""
    env = {**os.environ, "FASTMEM_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "fastmem.train", *RUN, *flags, "--out", str(out)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "epoch 1 never ended"
        time.sleep(0.005)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run_dir / "metrics.jsonl")]


def test_ctrl_c_checkpoints_mid_epoch_and_the_resume_equals_the_uninterrupted_run(
        tmp_path: Path, uninterrupted: tuple[Path, list[str]]) -> None:
    uninterrupted, flags = uninterrupted
    out = tmp_path / "run"
    stopped = _signal_during_epoch_2(out, signal.SIGINT, *flags)
    assert stopped.returncode == 130, stopped.stderr
    match = re.fullmatch(rf"fastmem: interrupted at epoch (\d+), step (\d+); checkpoint written; "
                         rf"resume with --resume {re.escape(str(out))}\n", stopped.stderr)
    assert match, stopped.stderr
    epoch, step = int(match[1]), int(match[2])
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    progress = checkpoint["in_progress"]
    assert (epoch, checkpoint["epoch"], progress["epoch"], progress["step"]) == (2, 1, 2, step) and 1 <= step < 32
    assert progress["seen"] == 32 * step and progress["losses"].shape == (step,)
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]

    resumed = run_module("fastmem.train", "--resume", str(out), "--progress", "false")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(uninterrupted, out, EPOCHS)
    whole, part = load_checkpoint(uninterrupted / "checkpoint.pt"), load_checkpoint(out / "checkpoint.pt")
    assert "in_progress" not in part
    for index, state in whole["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, part["optimizer"]["state"][index][key]), (index, key)
    assert torch.equal(whole["rng"]["torch"], part["rng"]["torch"])
    assert _records(out) == _records(uninterrupted)  # epoch 2's loss and fits too: its accumulators were saved


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)], ids=["SIGTERM", "SIGUSR1"])
def test_sigterm_and_slurms_sigusr1_stop_the_same_way_with_128_plus_the_signal(
        tmp_path: Path, signum: int, code: int) -> None:
    out = tmp_path / "run"
    stopped = _signal_during_epoch_2(out, signum)
    assert stopped.returncode == code, stopped.stderr
    assert stopped.stderr.startswith("fastmem: interrupted at epoch 2, step ") and stopped.stderr.count("\n") == 1
    assert load_checkpoint(out / "checkpoint.pt")["in_progress"]["epoch"] == 2


def test_a_second_signal_while_the_checkpoint_is_written_aborts_and_keeps_the_previous_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "epoch": 1})
    before = path.read_bytes()
    real_save = torch.save

    def save_then_interrupt(payload, file):
        real_save(payload, file)  # half written: the rename has not happened yet
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C
        time.sleep(1)  # the handler runs here

    monkeypatch.setattr(torch, "save", save_then_interrupt)
    previous = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C only asks to stop
        assert stop.requested == signal.SIGINT
        with pytest.raises(SystemExit) as aborted:
            save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 2})
    assert aborted.value.code == 130
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored on exit
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
