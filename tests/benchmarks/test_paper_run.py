"""benchmarks/paper_run.py on a CPU at tiny sizes: both halves are measured, the projected run follows from the
measured per-epoch and per-probe times, the table and the machine are printed, and bad sizes are refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO

BENCHMARK = REPO / "benchmarks" / "paper_run.py"
EPOCHS, PROBE_EVERY = 1000, 2
TINY = ["--device", "cpu", "--samples", "384", "--image-size", "16", "--model", "small_cnn", "--width", "0.25",
        "--bottleneck-dim", "256", "--batch-size", "64", "--probe-queries", "100", "--probe-reference", "256",
        "--seconds", "2", "--warmup-steps", "1", "--probe-every", str(PROBE_EVERY), "--epochs", str(EPOCHS),
        "--reference-workers", "1", "--threads", "1", "--precision", "fp32", "--no-progress"]


def run_benchmark(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FASTMEM_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(BENCHMARK), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path_factory.mktemp("paper_run") / "paper_run.json"
    result = run_benchmark(*TINY, "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return result, json.loads(out.read_text())


def test_both_halves_are_measured_with_positive_throughput(tiny_run: tuple[Any, dict[str, Any]]) -> None:
    _, payload = tiny_run
    halves = payload["halves"]
    assert list(halves) == ["fastmem", "reference"]
    for half in halves.values():
        assert half["steps"] >= 1 and half["train_s"] > 0 and half["images_per_s"] > 0
        assert half["images_per_s"] == pytest.approx(half["steps"] * 64 / half["train_s"])
        assert half["probe_epochs"][0] == 0 and all(e % PROBE_EVERY == 0 for e in half["probe_epochs"])
        assert all(t > 0 for t in half["probe_s"])
    assert set(halves["reference"]["accuracy"]) == {"h"}  # the reference code probes h only
    assert {"h", "z", "head_hidden"} <= set(halves["fastmem"]["accuracy"])  # ours: every layer
    assert payload["ratios"]["images_per_s"] == pytest.approx(
        halves["fastmem"]["images_per_s"] / halves["reference"]["images_per_s"])


def test_shares_of_the_projected_run_sum_to_one(tiny_run: tuple[Any, dict[str, Any]]) -> None:
    _, payload = tiny_run
    for half in payload["halves"].values():
        projection = half["projection"]
        shares = [projection[f"{part}_share"] for part in ("loader", "step", "probe")]
        assert all(0 <= share <= 1 for share in shares)
        assert sum(shares) == pytest.approx(1.0)
        assert half["loader_s"] + half["step_s"] == pytest.approx(half["train_s"])


def test_projection_is_epochs_times_epoch_time_plus_scheduled_probes(tiny_run: tuple[Any, dict[str, Any]]) -> None:
    _, payload = tiny_run
    for half in payload["halves"].values():
        epoch_s = half["train_s"] / half["steps"] * half["steps_per_epoch"]  # the mean step, times an epoch's steps
        assert half["per_epoch"]["epoch_s"] == pytest.approx(epoch_s)
        projection = half["projection"]
        probe_mean = sum(half["probe_s"]) / len(half["probe_s"])
        assert projection["probes"] == EPOCHS // PROBE_EVERY
        assert projection["total_s"] == pytest.approx(EPOCHS * epoch_s + EPOCHS // PROBE_EVERY * probe_mean)
    assert payload["ratios"]["projected_total_s"] == pytest.approx(
        payload["halves"]["fastmem"]["projection"]["total_s"] / payload["halves"]["reference"]["projection"]["total_s"])


def test_table_names_the_machine_the_reference_knn_and_the_ratios(tiny_run: tuple[Any, dict[str, Any]]) -> None:
    result, payload = tiny_run
    assert "ours ÷ ref" in result.stdout and f"projected {EPOCHS:,} epochs" in result.stdout
    assert "machine: " in result.stdout and payload["machine"]["cpu"] in result.stdout
    knn = "scikit-learn KNeighborsClassifier" if _has_sklearn() else "numpy brute-force cosine k-NN"
    assert knn in result.stdout and knn in payload["halves"]["reference"]["setup"]


@pytest.mark.parametrize(("flag", "value", "named"), [("--samples", "0", "--samples"), ("--seconds", "0", "--seconds"),
                                                       ("--probe-reference", "999999", "--probe-reference")])
def test_bad_sizes_give_one_error_line_and_a_nonzero_exit(flag: str, value: str, named: str, tmp_path: Path) -> None:
    out = tmp_path / "never.json"
    result = run_benchmark(*TINY, flag, value, "--out", str(out))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastmem: error: ") and named in lines[0], result.stderr
    assert not out.exists()


def test_numpy_reference_knn_agrees_with_scikit_learn(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sklearn")
    from sklearn.neighbors import KNeighborsClassifier

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from paper_run import numpy_knn_predict

    rng = np.random.default_rng(0)
    reference, queries = rng.normal(size=(600, 24)), rng.normal(size=(300, 24))
    labels = rng.integers(0, 5, 600)
    expected = KNeighborsClassifier(n_neighbors=7, metric="cosine", algorithm="brute").fit(reference, labels)
    assert np.array_equal(numpy_knn_predict(reference, labels, queries, 7, 5), expected.predict(queries))


def _has_sklearn() -> bool:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True
