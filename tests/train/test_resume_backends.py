"""Resume exactness on every backend, and the FFCV backend's temporary .beton on every exit path.

Through real processes, as test_signals.py does it: a run is sent SIGINT as soon as epoch 1's record is in
metrics.jsonl (so the signal lands early in epoch 2 of 16 steps), stops with its mid-epoch checkpoint, is resumed
with `--resume`, and must equal the uninterrupted run of its config bit for bit: every model tensor
(conftest.assert_same_weights) and every metrics record but its timing keys. Configurations: the torch pipeline
with 2 worker processes, dali (CPU), ffcv, and the device pipeline under bf16 autocast on CPU with i.i.d. views
(`--iid-views 2`, experiment G) and fixed views with a label per view (`--augment fullfixed:3:random`). The ffcv
run is compared with the device pipeline's uninterrupted run: the ffcv backend executes the device backend's
views on the same pixels bit for bit (backends/ffcv.py), which also spares a third FFCV process (each pays
~10 s of numba compilation on import). The plain device pipeline's SIGINT resume is test_signals.py's.

A kill *between* checkpoints: `--checkpoint-every 5`, SIGKILL during epoch 2 (no checkpoint exists yet), then
`--resume`: the run starts over and must equal the uninterrupted one, its metrics without duplicates.

The FFCV temporary .beton (TMPDIR is a per-test folder): gone while the run trains, after SIGINT, after the
resume's normal end and after a construction that fails; the folders a writer killed mid-write by SIGKILL or
SIGTERM left are removed by the next FFCV start, and never while their writer lives.

Every process scenario (the uninterrupted runs, each interrupt-and-resume, the kill) is module-scoped and runs
on a pool of PARALLEL threads, each driving its own subprocesses, started on first use; each test waits for the
scenarios it checks. Two cores run them about twice as fast as one after the other.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, assert_same_weights, run_module

from fastmem.errors import FastmemError
from fastmem.run.metrics import read_metrics

EPOCHS, STEPS = 3, 16
TINY = ["--subset", "128", "--probe-subset", "100", "--model", "small_cnn", "--width", "0.25", "--bottleneck-dim", "64",
        "--batch-size", "8", "--epochs", str(EPOCHS), "--device", "cpu", "--threads", "1", "--progress", "false"]
SYNTHETIC = ["--dataset", "synthetic", "--image-size", "16", *TINY]
CONFIGS = {  # name → trainer arguments of the uninterrupted run and its interrupted twin
    "device": [*SYNTHETIC, "--pipeline", "device"],
    "torch": [*SYNTHETIC, "--pipeline", "torch", "--workers", "2", "--augment", "standard"],  # per-sample full: slow
    "dali": [*SYNTHETIC, "--pipeline", "dali"],
    "views-bf16": ["--dataset", "fashion-mnist", *TINY, "--pipeline", "device", "--precision", "bf16",
                   "--iid-views", "2", "--augment", "fullfixed:3:random"],
}
NEEDS = {"dali": "nvidia.dali", "ffcv": "ffcv"}
TIMING_KEYS = {"images_per_s", "seconds"}
PARALLEL = 3  # scenario threads (one subprocess each at a time; a run waits on I/O while it starts)


def _env(tmp: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "FASTMEM_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if tmp is not None:
        tmp.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmp)
    return env


def _installed(name: str) -> bool:
    package = NEEDS.get(name)
    return package is None or importlib.util.find_spec(package.split(".")[0]) is not None


def _skip_without(name: str) -> None:
    if not _installed(name):
        pytest.skip(f"{NEEDS[name]} is not installed (pip install -e .[{name}])")


def _uninterrupted(args: list[str], out: Path) -> Path:
    result = subprocess.run([sys.executable, "-m", "fastmem.train", *args, "--out", str(out)], cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out


def _records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run_dir / "metrics.jsonl")]


def _start(args: list[str], out: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fastmem.train", *args, "--out", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_epoch_1(process: subprocess.Popen[str], out: Path) -> None:
    """Return as soon as epoch 1's record is in metrics.jsonl (the run is then early in epoch 2)."""
    deadline = time.monotonic() + 180
    while not any(r.get("epoch") == 1 for r in _safe_records(out)):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "epoch 1 never ended"
        time.sleep(0.005)


def _safe_records(out: Path) -> list[dict]:
    try:
        return read_metrics(out / "metrics.jsonl")
    except FastmemError:  # a line being written
        return []


def _interrupt_and_resume(args: list[str], out: Path, env: dict[str, str],
                          during: Callable[[Path], None] | None = None) -> Path:
    """SIGINT early in epoch 2 (`during(out)` runs just before the signal), check the stop, resume to the end."""
    process = _start(args, out, env)
    _wait_for_epoch_1(process, out)
    if during is not None:
        during(out)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 130, stderr
    assert stderr.startswith("fastmem: interrupted at epoch 2, step ") and stderr.count("\n") == 1, stderr
    step = int(stderr.split("step ")[1].split(";")[0])
    assert 1 <= step < STEPS, stderr  # mid-epoch
    resumed = subprocess.run([sys.executable, "-m", "fastmem.train", "--resume", str(out), "--progress", "false"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    return out


def _ffcv_temps(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.glob("fastmem-ffcv-*"))


def _killed_writer(tmp: Path, signum: int) -> Path:
    """A process that holds a temporary .beton folder, killed by `signum` mid-write: the folder it leaves.

    (SIGTERM while the trainer builds its loader has its default effect: the trainer's handlers come after.)"""
    code = ("import sys, time\nfrom fastmem.pipelines.backends.ffcv import TemporaryBeton\n"
            "t = TemporaryBeton(sys.argv[1])\nt.path.write_bytes(bytes(4096))\nprint(t.folder, flush=True)\n"
            "time.sleep(120)\n")
    writer = subprocess.Popen([sys.executable, "-c", code, str(tmp)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              text=True)
    folder = Path(writer.stdout.readline().strip())
    from fastmem.pipelines.backends.ffcv import remove_stale_betons

    assert remove_stale_betons(tmp) == [] and (folder / "source.beton").exists()  # its writer lives: kept
    writer.send_signal(signum)
    assert writer.wait() == -signum
    assert (folder / "source.beton").exists()  # what SIGKILL leaves behind
    return folder


def _ffcv_scenario(root: Path) -> Path:
    """Stale folders of a SIGKILLed and a SIGTERMed writer, then an ffcv run stopped by SIGINT and resumed (one TMPDIR)."""
    tmp, out = root / "tmp", root / "run"
    env = _env(tmp)
    stale = [_killed_writer(tmp, signal.SIGKILL), _killed_writer(tmp, signal.SIGTERM)]

    def while_training(_: Path) -> None:  # the next FFCV start removed the stale folder; its own file is gone too
        assert _ffcv_temps(tmp) == [], "a temporary .beton is on disk while the run trains"

    _interrupt_and_resume([*SYNTHETIC, "--pipeline", "ffcv"], out, env, during=while_training)
    assert not any(f.exists() for f in stale) and _ffcv_temps(tmp) == []  # after SIGINT and the resume's end
    return out


def _kill_scenario(out: Path) -> Path:
    """SIGKILL during epoch 2 of a run checkpointing every 5 epochs (none written yet), then --resume."""
    process = _start([*CONFIGS["device"], "--checkpoint-every", "5"], out, _env())
    _wait_for_epoch_1(process, out)
    process.kill()  # no handler runs
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "checkpoint.pt").exists() and [r["epoch"] for r in read_metrics(out / "metrics.jsonl")][:2] == [0, 1]
    resumed = run_module("fastmem.train", "--resume", str(out), "--progress", "false")
    assert resumed.returncode == 0, resumed.stderr
    return out


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, str], Future[Path]]]:
    """Every process scenario, submitted at once (longest first) to PARALLEL threads; test ids → futures."""
    root = tmp_path_factory.mktemp("resume")
    pool = ThreadPoolExecutor(max_workers=PARALLEL)
    jobs: dict[tuple[str, str], Future[Path]] = {}
    if _installed("ffcv"):
        jobs["sigint", "ffcv"] = pool.submit(_ffcv_scenario, root / "ffcv")
    for name, args in CONFIGS.items():
        if _installed(name):
            jobs["reference", name] = pool.submit(_uninterrupted, args, root / "reference" / name)
            if name != "device":
                jobs["sigint", name] = pool.submit(_interrupt_and_resume, args, root / "sigint" / name, _env())
    jobs["sigkill", "device"] = pool.submit(_kill_scenario, root / "sigkill")
    yield jobs
    pool.shutdown(wait=True, cancel_futures=True)


def _assert_equal_runs(resumed: Path, reference: Path) -> None:
    assert_same_weights(reference, resumed, EPOCHS)
    assert _records(resumed) == _records(reference)


@pytest.mark.parametrize("name", ["torch", "dali", "views-bf16"])
def test_sigint_mid_epoch_then_resume_equals_the_uninterrupted_run(scenarios: dict, name: str) -> None:
    _skip_without(name)
    _assert_equal_runs(scenarios["sigint", name].result(), scenarios["reference", name].result())


def test_ffcv_sigint_resume_equals_the_uninterrupted_run_and_leaves_no_beton(scenarios: dict) -> None:
    _skip_without("ffcv")
    _assert_equal_runs(scenarios["sigint", "ffcv"].result(), scenarios["reference", "device"].result())


def test_sigkill_between_checkpoints_then_resume_equals_the_uninterrupted_run(scenarios: dict) -> None:
    _assert_equal_runs(scenarios["sigkill", "device"].result(), scenarios["reference", "device"].result())


def test_ffcv_temp_beton_is_removed_when_the_loader_fails_to_build(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _skip_without("ffcv")
    import tempfile

    from fastmem.pipelines import LoaderOptions, make_loader
    from fastmem.pipelines.backends.ffcv import FfcvLoader

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    images = np.zeros((64, 16, 16, 3), np.uint8)
    with pytest.raises(FastmemError, match="fewer than one batch of 128"):  # raised once the file is written and read
        FfcvLoader(images, np.arange(64) % 4, LoaderOptions(batch_size=128))
    assert _ffcv_temps(tmp_path) == []
    loader = make_loader("ffcv", images, np.arange(64) % 4, augment="none", batch_size=32)
    assert _ffcv_temps(tmp_path) == []  # mapped, then removed from disk at once
    assert sum(b.images.shape[0] for b in loader) == 64  # and still read from the mapping
    loader.close()
