"""Shared test set-up: no network, quick synthetic runs, and a helper to call CLIs as a user would."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import slurm_cluster  # noqa: F401 - the session fixture of tests/experiments/test_slurm.py

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-minutes", type=float, default=None, metavar="N",
                     help="run tests/data/test_fuzz_readers.py for about N minutes in all (default: a bounded CI budget; "
                          "also $FASTMEM_FUZZ_MINUTES)")


# The heavy tests (end-to-end trainings, sweeps, several processes, interpreters, wheels): marked `slow` here, in one
# place. `make test-fast` runs everything else (`-m "not slow and not slurm"`); `make test` (CI) runs all.
SLOW_FILES = frozenset({
    "experiments/test_experiments.py", "experiments/test_demo.py", "experiments/test_sweep_kill.py",
    "experiments/test_slurm.py", "train/test_signals.py", "train/test_disk_full.py", "train/test_ddp.py",
    "train/test_ddp_faults.py", "train/test_soak.py", "train/test_resume_backends.py", "train/test_train.py",
    "train/test_precision.py", "train/test_fast_step.py", "train/test_mixing.py", "train/test_reinit.py",
    "probe/test_probe_faults.py", "probe/test_probe_any_model.py", "probe/test_probe.py",
    "report/test_report_stats.py", "data/test_fuzz_readers.py", "benchmarks/test_paper_run.py",
    "pipelines/test_fused_sampled.py", "pipelines/test_fused_executors.py", "pipelines/test_dali_loader.py",
    "pipelines/test_ffcv_loader.py", "pipelines/test_dropin_example.py", "project/test_install.py",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests = Path(__file__).resolve().parent
    for item in items:
        if item.path.resolve().relative_to(tests).as_posix() in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASTMEM_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run a test with one torch thread (fair timing on a shared 2-core machine), then restore."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_module(module: str, *args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run `python -m module args...` in a subprocess, offline, capturing text output."""
    env = {**os.environ, "FASTMEM_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_same_weights(run_a: Path, run_b: Path, epoch: int) -> None:
    """Both runs' checkpoints are at `epoch` and hold bit-identical model tensors."""
    from fastmem.run.checkpoint import load_checkpoint

    a, b = load_checkpoint(run_a / "checkpoint.pt"), load_checkpoint(run_b / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == epoch
    for name, tensor in a["model"].items():
        assert tensor.equal(b["model"][name]), name


# A tiny run: synthetic 16 px images, the small CNN at quarter width, a few hundred samples.
QUICK_RUN = ["--dataset", "synthetic", "--image-size", "16", "--subset", "256", "--probe-subset", "200",
             "--model", "small_cnn", "--width", "0.25", "--bottleneck-dim", "256", "--batch-size", "64",
             "--device", "cpu", "--threads", "1", "--progress", "false", "--precision", "fp32"]


# /proc/cpuinfo of a CPU that declares native bf16 (AVX-512 BF16), for $FASTMEM_CPUINFO (fastmem/cpu_precision.py).
FAKE_AVX512_BF16_CPUINFO = ("processor\t: 0\nmodel name\t: fastmem test CPU declaring avx512_bf16\n"
                            "flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni avx512_bf16\n")
# The precisions the exactness tests (resume, signals, disk full, DDP, probe cache) run under: fp32; bf16 forced
# (CPU autocast runs without native bf16 too, only slower); and `auto` on a CPU faked to declare avx512_bf16, so the
# measured decision is exercised on every machine CI lands on (each test's processes must agree on it).
EXACTNESS_PRECISIONS = ("fp32", "bf16", "auto-avx512_bf16")


@contextlib.contextmanager
def precision_mode(mode: str, scratch: Path) -> Iterator[list[str]]:
    """The trainer flags of `mode` (one of EXACTNESS_PRECISIONS), with the faked CPU in the environment while open."""
    with pytest.MonkeyPatch.context() as env:
        if mode == "auto-avx512_bf16":
            fake = scratch / "cpuinfo"
            fake.write_text(FAKE_AVX512_BF16_CPUINFO)
            env.setenv("FASTMEM_CPUINFO", str(fake))
            yield ["--precision", "auto"]
        else:
            yield ["--precision", mode]


@pytest.fixture(scope="module", params=EXACTNESS_PRECISIONS)
def precision_flags(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """`--precision ...` for each of EXACTNESS_PRECISIONS in turn (module-wide: the module's shared runs use it)."""
    from fastmem.cpu_precision import cpu_precision_choice

    with precision_mode(request.param, tmp_path_factory.mktemp("cpu")) as flags:
        cpu_precision_choice.cache_clear()  # this process's kept choice belongs to the real CPU
        yield flags
    cpu_precision_choice.cache_clear()
