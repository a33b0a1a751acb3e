"""Seeds and data choices: --seeds plans every variant per seed and varies only the run seed; the data seed alone
picks the subset, the queries and the fixed probe reference (shared across F's N axis); G without a subset fails
in planning; the demo's --seeds summary is the mean and sd over its seeds."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from conftest import run_module

from fastmem.data.splits import load_run_splits
from fastmem.errors import FastmemError
from fastmem.experiments.specs import EXPERIMENTS
from fastmem.experiments.sweep import plan_experiment, validate_plan


def test_seeds_plan_every_variant_per_seed_varying_only_run_and_label_seeds(tmp_path: Path) -> None:
    runs = plan_experiment(EXPERIMENTS["A"], "smoke", tmp_path, {}, seeds=3)
    labels = [v.label for v in EXPERIMENTS["A"].variants("smoke")]
    assert [(r.variant.label, r.seed) for r in runs] == [(label, s) for s in range(3) for label in labels]
    assert len({r.run_dir for r in runs}) == len(runs)
    for label in labels:
        configs = [r.config.to_dict() for r in runs if r.variant.label == label]
        changed = {k for c in configs for k in c if c[k] != configs[0][k]}
        assert changed == {"seed", "label_seed", "out"}
        assert [c["seed"] for c in configs] == [0, 1, 2] and {c["data_seed"] for c in configs} == {0}
    # One seed plans exactly the runs of no seed option.
    assert [r.run_dir for r in plan_experiment(EXPERIMENTS["A"], "smoke", tmp_path, {}, seeds=1)] == \
           [r.run_dir for r in plan_experiment(EXPERIMENTS["A"], "smoke", tmp_path, {})]


def test_seeds_with_an_explicit_seed_is_one_line() -> None:
    result = run_module("fastmem.experiments", "show", "A", "--scale", "smoke", "--seeds", "2", "--set", "seed=4")
    assert result.returncode != 0
    assert "--set seed=4 with --seeds 2" in result.stderr and "Traceback" not in result.stderr


def test_the_data_seed_alone_picks_subset_queries_and_reference() -> None:
    def splits(subset: int, seed: int, reference: int = 0):
        return load_run_splits("synthetic", None, subset=subset, probe_subset=300, image_size=8, seed=seed,
                               probe_reference=reference)

    small, large = splits(100, 0, reference=400), splits(400, 0, reference=400)
    assert set(small.train_indices) < set(large.train_indices)  # smaller subsets lie inside larger ones
    np.testing.assert_array_equal(small.test.images, large.test.images)  # queries do not depend on N
    np.testing.assert_array_equal(small.reference.images, large.reference.images)  # nor does the reference
    np.testing.assert_array_equal(large.reference.images, large.train.images)
    other = splits(100, 1, reference=400)
    assert not np.array_equal(other.test.images, small.test.images)
    assert not np.array_equal(splits(100, 0).reference.images, small.reference.images)


@pytest.mark.parametrize("scale", ["cpu", "paper"])
def test_f_variants_share_one_reference_and_one_query_set(tmp_path: Path, scale: str) -> None:
    runs = plan_experiment(EXPERIMENTS["F"], scale, tmp_path, {})
    subsets = {r.config.subset or 50000 for r in runs}
    assert len(subsets) >= 3
    assert {r.config.probe_reference for r in runs} == {max(subsets)}
    assert len({(r.config.data_seed, r.config.probe_subset) for r in runs}) == 1
    equal_steps = [r for r in runs if r.variant.group == "training images N at equal steps"]
    assert len({r.config.epochs for r in runs if r not in equal_steps}) == 1
    # The data-size axis at equal optimizer steps: every N trains the base run's steps (last partial batch dropped),
    # to within one epoch's steps.
    base = next(r.config for r in runs if r not in equal_steps)
    steps = (base.subset or 50000) // base.batch_size * base.epochs
    assert equal_steps and all(abs(r.config.subset // r.config.batch_size * r.config.epochs - steps)
                               <= r.config.subset // r.config.batch_size for r in equal_steps)


def test_g_without_a_subset_fails_in_planning(tmp_path: Path) -> None:
    runs = plan_experiment(EXPERIMENTS["G"], "smoke", tmp_path, {"subset": 0})
    with pytest.raises(FastmemError, match="--iid-views .* needs a --subset"):
        validate_plan(runs)
    assert not (tmp_path / "runs").exists()


def test_demo_seeds_report_the_mean_and_sd_of_its_seeds(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = run_module("fastmem.demo", "--out", str(out), "--dataset", "synthetic", "--subset", "128",
                        "--probe-subset", "100", "--epochs", "1", "--probe-every", "1", "--bottleneck-dim", "32",
                        "--batch-size", "64", "--width", "0.25", "--seeds", "2")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and len(summary["runs"]) == 4
    for label in ("full augmentation", "no augmentation"):
        finals = []
        for seed in (0, 1):
            run_dir = Path(summary["runs"][f"{label} (seed {seed})"])
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            finals.append([r["knn/h"] for r in records if "knn/h" in r][-1])
        entry = summary["layers"]["h"][label]
        assert entry["accuracy"] == pytest.approx(statistics.mean(finals))
        assert entry["seed_std"] == pytest.approx(statistics.stdev(finals))
        assert [p["value"] for p in entry["per_seed"]] == pytest.approx(finals)
    assert " sd |" in result.stdout


def test_show_at_the_paper_scale_says_its_epochs_are_a_tenth_of_the_papers() -> None:
    result = run_module("fastmem.experiments", "show", "A", "--scale", "paper", "--dataset", "synthetic", "--set", "device=cpu")
    assert result.returncode == 0, result.stderr
    assert "a tenth of the paper's 10,000" in result.stdout and "--set epochs=10000" in result.stdout
    assert "--precision fp32" in result.stdout and "--probe-project-dim" not in result.stdout  # 0: exact


@pytest.mark.parametrize("flag", ["--data-seed", "--label-seed"])
def test_a_negative_data_or_label_seed_is_one_line(tmp_path: Path, flag: str) -> None:
    result = run_module("fastmem.train", "--dataset", "synthetic", "--subset", "64", "--epochs", "1", flag, "-1",
                        "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and f"{flag} must be >= 0" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
