"""Issue 13 item 3: every file fastmem reads, torn, truncated, 0-byte, garbage or foreign, is one line naming
the file and what is wrong, exit status 2, and nothing in the run (or data) directory changes.

The faults are real damaged files in a real run directory, read by the real CLI (`python -m fastmem.train
--resume RUN_DIR`, `--data-dir DIR`): in a subprocess where the whole process matters (a resume that must
complete, the other-run checkpoint), otherwise through the same `main` under `run_cli` in this process
(the same code path, without a second torch start-up on a shared 2-core machine). The run directory's
`.lock` is left out of the byte comparisons: each process that takes the lock writes its pid there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUICK_RUN, assert_same_weights, run_module

from fastmem.data.cifar import write_cifar
from fastmem.data.idx import write_idx_images, write_idx_labels
from fastmem.errors import run_cli
from fastmem.run.metrics import read_metrics
from fastmem.train.loop import main as train_main

RUN = [*QUICK_RUN, "--probe-every", "-1", "--checkpoint-every", "1"]
TIMING_KEYS = {"images_per_s", "seconds"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base: 2 epochs; whole: the same run for 3 epochs; other: 1 epoch of another config (lr, label seed)."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    try:
        assert train_main([*RUN, "--epochs", "2", "--out", str(root / "base")]) == 0
        assert train_main([*RUN, "--epochs", "3", "--out", str(root / "whole")]) == 0
        assert train_main([*RUN, "--epochs", "1", "--lr", "0.001", "--label-seed", "3", "--out", str(root / "other")]) == 0
    finally:
        torch.set_num_threads(threads)
    return root


def digests(directory: Path) -> dict[str, str]:
    """sha256 of every file below `directory` except the lock file (which holds its last holder's pid)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}


def copy_run(runs: Path, tmp_path: Path, name: str = "base") -> Path:
    target = tmp_path / "run"
    shutil.copytree(runs / name, target)
    return target


def cli_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    """`python -m fastmem.train ARGS` as run_cli runs it here: (exit status, non-empty stderr lines)."""
    threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exited:
            run_cli(train_main, list(args))
    finally:
        torch.set_num_threads(threads)
    return int(exited.value.code), [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run_dir / "metrics.jsonl")]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(13).bytes(max(64, path.stat().st_size)))


DAMAGE: dict[str, Callable[[Path], None]] = {"truncated": truncate, "empty": empty, "garbage": garbage}
EXPECTED = {  # (file, damage) -> what the one line says is wrong
    ("config.json", "truncated"): "not valid JSON", ("config.json", "empty"): "empty file",
    ("config.json", "garbage"): "not UTF-8 text",
    ("labels.npz", "truncated"): "not a readable labels file", ("labels.npz", "empty"): "empty file",
    ("labels.npz", "garbage"): "not a readable labels file",
    ("checkpoint.pt", "truncated"): "not a loadable fastmem checkpoint (PytorchStreamReader failed",
    ("checkpoint.pt", "empty"): "not a loadable fastmem checkpoint (an empty file)",
    ("checkpoint.pt", "garbage"): "not a loadable fastmem checkpoint (no zip archive",
}


@pytest.mark.parametrize(("name", "damage"), sorted(EXPECTED))
def test_a_damaged_run_file_is_one_line_and_changes_nothing(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           name: str, damage: str) -> None:
    run_dir = copy_run(runs, tmp_path)
    DAMAGE[damage](run_dir / name)
    before = digests(run_dir)
    status, lines = cli_in_process(capsys, "--resume", str(run_dir), "--epochs", "3")
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith(f"fastmem: error: {run_dir / name}"), lines
    assert EXPECTED[name, damage] in lines[0]
    assert digests(run_dir) == before


def _edit_checkpoint(run_dir: Path, edit: Callable[[dict], None]) -> None:
    path = run_dir / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)


def _other_shape(payload: dict) -> None:
    name = next(n for n, t in payload["model"].items() if t.ndim == 4)
    weight = payload["model"][name]
    payload["model"][name] = torch.zeros(weight.shape[0] * 2, *weight.shape[1:])


def _other_moment_shape(payload: dict) -> None:
    state = next(iter(payload["optimizer"]["state"].values()))
    state["exp_avg"] = torch.zeros(3, 5)


CHECKPOINT_FAULTS: dict[str, tuple[Callable[[dict], None], str]] = {
    "no optimizer": (lambda p: p.pop("optimizer"), "checkpoint lacks optimizer"),
    "no rng": (lambda p: p.pop("rng"), "checkpoint lacks rng"),
    "rng of another kind": (lambda p: p["rng"].update(torch=torch.zeros(3)), "is not a torch CPU RNG state"),
    "model tensor of another shape": (_other_shape, "has shape"),
    "optimizer moment of another shape": (_other_moment_shape, "optimizer exp_avg of"),
    "foreign dict": (lambda p: [p.pop(k) for k in list(p) if k != "rng"], "missing model/epoch"),
}


@pytest.mark.parametrize("fault", sorted(CHECKPOINT_FAULTS))
def test_an_incomplete_or_misshapen_checkpoint_is_one_line(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          fault: str) -> None:
    edit, expected = CHECKPOINT_FAULTS[fault]
    run_dir = copy_run(runs, tmp_path)
    _edit_checkpoint(run_dir, edit)
    before = digests(run_dir)
    status, lines = cli_in_process(capsys, "--resume", str(run_dir), "--epochs", "3")
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith(f"fastmem: error: {run_dir / 'checkpoint.pt'}: "), lines
    assert expected in lines[0]
    assert digests(run_dir) == before


def test_another_runs_checkpoint_names_the_differing_knobs(runs: Path, tmp_path: Path) -> None:
    run_dir = copy_run(runs, tmp_path)
    shutil.copy(runs / "other" / "checkpoint.pt", run_dir / "checkpoint.pt")
    before = digests(run_dir)
    result = run_module("fastmem.train", "--resume", str(run_dir), "--epochs", "3")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"fastmem: error: {run_dir / 'checkpoint.pt'}: written by another run"), line
    assert "--lr 0.001 (config.json: 0.0003)" in line and "--label-seed 3 (config.json: 0)" in line
    assert "--seed" not in line and "--epochs" not in line  # only the knobs that differ
    assert digests(run_dir) == before


def test_a_garbage_metrics_line_before_the_last_is_one_line(runs: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = copy_run(runs, tmp_path)
    first, second = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text(f"{first}\n{second[:7]}\x00garbage\n{second}\n")
    before = digests(run_dir)
    status, lines = cli_in_process(capsys, "--resume", str(run_dir), "--epochs", "3")
    assert status == 2
    assert lines == [f"fastmem: error: {run_dir / 'metrics.jsonl'}:2: not a JSON line; not a metrics record"]
    assert digests(run_dir) == before


def test_a_torn_last_metrics_line_is_dropped_and_the_resume_equals_an_uninterrupted_run(runs: Path, tmp_path: Path) -> None:
    run_dir = copy_run(runs, tmp_path)
    whole_third = (runs / "whole" / "metrics.jsonl").read_text().splitlines()[2]
    with open(run_dir / "metrics.jsonl", "a") as handle:  # what an append killed half-way leaves: no newline
        handle.write(whole_third[: len(whole_third) // 2])
    result = run_module("fastmem.train", "--resume", str(run_dir), "--epochs", "3")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert warnings == [f"fastmem: warning: {run_dir / 'metrics.jsonl'}:3: dropped a torn last line (not a JSON line; "
                        "an interrupted write)"]
    assert records(run_dir) == records(runs / "whole")
    assert (run_dir / "metrics.jsonl").read_text().endswith("}\n")
    assert_same_weights(run_dir, runs / "whole", epoch=3)


def _fashion_mnist(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 300), ("t10k", 200)):
        write_idx_images(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx_labels(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return root


def _cifar(root: Path) -> Path:
    rng = np.random.default_rng(0)
    split = lambda n: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n))  # noqa: E731
    write_cifar(root, "cifar10", train=split(300), test=split(200))
    return root


class _PlantsAFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_batch(directory: Path, marker: Path) -> None:
    import pickle

    (directory / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps({b"data": _PlantsAFile(marker)}))


DATA_FAULTS: dict[str, tuple[str, Callable[[Path], Path], Callable[[Path, Path], None], str, str]] = {
    # fault -> (dataset, writer, damage(root, marker), the file named, what is wrong)
    "fashion-mnist: download stopped before the test files": (
        "fashion-mnist", _fashion_mnist, lambda r, m: [(r / f"t10k-{k}-idx{d}-ubyte.gz").unlink()
                                                       for k, d in (("images", 3), ("labels", 1))],
        "t10k-images-idx3-ubyte[.gz]", "missing Fashion-MNIST file"),
    "fashion-mnist: truncated train images": (
        "fashion-mnist", _fashion_mnist, lambda r, m: truncate(r / "train-images-idx3-ubyte.gz"),
        "train-images-idx3-ubyte.gz", "corrupt or truncated gzip data"),
    "cifar10: download stopped before data_batch_4": (
        "cifar10", _cifar, lambda r, m: [(r / "cifar-10-batches-py" / f"data_batch_{i}").unlink() for i in (4, 5)],
        "cifar-10-batches-py/data_batch_4", "missing CIFAR file"),
    "cifar10: truncated batch": (
        "cifar10", _cifar, lambda r, m: truncate(r / "cifar-10-batches-py" / "data_batch_3"),
        "cifar-10-batches-py/data_batch_3", "corrupt or truncated pickle"),
    "cifar10: a batch that would run code": (
        "cifar10", _cifar, _evil_batch, "cifar-10-batches-py/data_batch_2", "disallowed global"),
    "cifar10: garbage meta": (
        "cifar10", _cifar, lambda r, m: garbage(r / "cifar-10-batches-py" / "batches.meta"),
        "cifar-10-batches-py/batches.meta", "pickle"),
}


@pytest.mark.parametrize("fault", sorted(DATA_FAULTS))
def test_a_damaged_dataset_directory_is_one_line_and_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                    fault: str) -> None:
    dataset, write, damage, named, expected = DATA_FAULTS[fault]
    data_dir, marker = write(tmp_path / "data"), tmp_path / "code-ran"
    damage(data_dir, marker)
    before = digests(data_dir)
    assert QUICK_RUN[:4] == ["--dataset", "synthetic", "--image-size", "16"]
    status, lines = cli_in_process(capsys, "--dataset", dataset, *QUICK_RUN[4:], "--data-dir", str(data_dir), "--epochs", "1",
                                   "--out", str(tmp_path / "run"))
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith(f"fastmem: error: {data_dir / named}"), lines
    assert expected in lines[0]
    assert digests(data_dir) == before
    assert not marker.exists()
    assert not (tmp_path / "run" / "config.json").exists() and not (tmp_path / "run" / "labels.npz").exists()
