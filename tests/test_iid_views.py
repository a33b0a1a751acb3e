"""Experiment G's i.i.d. views: the reserved-image table, the loaders that show them, and a training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_module
from fastmem.pipelines import ViewPool, make_loader
from fastmem.pipelines.view_pool import iid_view_choice

from fastmem.data.iid_views import build_iid_view_pool, reserve_same_class_images
from fastmem.data.splits import load_run_splits
from fastmem.errors import FastmemError
from fastmem.run.metrics import read_metrics


def _labels(n: int = 600, classes: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


def test_the_table_holds_only_same_class_non_anchor_images_disjoint_across_anchors() -> None:
    labels = _labels()
    anchors = np.sort(np.random.default_rng(1).choice(len(labels), 100, replace=False))
    table = reserve_same_class_images(labels, anchors, 3, seed=7)
    assert table.shape == (100, 3) and table.dtype == np.int64
    assert np.all(labels[table] == labels[anchors][:, None])  # same true class as its anchor
    assert not np.isin(table, anchors).any()  # never an anchor, so never the anchor itself
    assert len(np.unique(table)) == table.size  # disjoint across anchors (and within one)


def test_the_table_is_deterministic_and_seeded() -> None:
    labels, anchors = _labels(), np.arange(0, 600, 6)
    first = reserve_same_class_images(labels, anchors, 2, seed=3)
    assert np.array_equal(first, reserve_same_class_images(labels, anchors, 2, seed=3))
    assert not np.array_equal(first, reserve_same_class_images(labels, anchors, 2, seed=4))


def test_too_few_same_class_images_is_one_clear_error() -> None:
    labels = np.array([0] * 10 + [1] * 4)
    anchors = np.array([0, 1, 10, 11])  # class 1: 2 anchors × 2 views need 4, only 2 left
    with pytest.raises(FastmemError, match=r"--iid-views 2 needs 4 more training images of class '1'.*only 2"):
        reserve_same_class_images(labels, anchors, 2, seed=0)


def test_the_pool_of_a_fashion_mnist_subset_is_the_split_pixels_of_the_table() -> None:
    splits = load_run_splits("fashion-mnist", None, subset=300, probe_subset=100, image_size=0, seed=5)
    pool = build_iid_view_pool(splits, 2, seed=5)
    table = reserve_same_class_images(splits.full_train.labels, splits.train_indices, 2, seed=5)
    assert pool.images.dtype == np.uint8 and pool.rows.shape == (300, 2)
    assert np.array_equal(pool.images[pool.rows], splits.full_train.images[table])
    assert np.array_equal(splits.full_train.labels[table], np.repeat(splits.train.labels[:, None], 2, axis=1))


def _pool_setup(n: int = 48, views: int = 3, size: int = 8):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8)
    pool_images = rng.integers(0, 256, (n * views, size, size, 1), dtype=np.uint8)
    rows = rng.permutation(n * views).reshape(n, views)
    targets = rng.integers(0, 10, n)
    return images, targets, ViewPool(pool_images, rows)


@pytest.mark.parametrize("pipeline", ["device", "torch"])
def test_loaders_show_the_chosen_reserved_image_scaled_to_unit_range_with_the_anchor_target(pipeline: str) -> None:
    images, targets, pool = _pool_setup()
    loader = make_loader(pipeline, images, targets, augment="none", batch_size=16, seed=2, view_pool=pool)
    for epoch in (1, 2):
        loader.set_epoch(epoch)
        for batch in loader:
            choice = iid_view_choice(2, epoch, batch.indices, 3)
            shown = torch.from_numpy(pool.images[pool.rows[batch.indices.numpy(), choice.numpy()]])
            expected = shown.permute(0, 3, 1, 2).float() / 255
            assert torch.allclose(batch.images, expected, atol=1e-6)
            assert float(batch.images.max()) <= 1.0
            assert torch.equal(batch.targets, torch.from_numpy(targets)[batch.indices])


def test_device_and_torch_loaders_show_the_same_views_and_the_choice_is_uniform() -> None:
    images, targets, pool = _pool_setup()
    epochs = []
    for pipeline in ("device", "torch"):
        loader = make_loader(pipeline, images, targets, augment="full", batch_size=16, seed=4, view_pool=pool)
        loader.set_epoch(3)
        epochs.append(list(loader))
    for a, b in zip(*epochs):
        assert torch.equal(a.indices, b.indices)
        assert (a.images - b.images).abs().mean() < 1e-3  # fused vs reference executor on the same pixels
    counts = torch.bincount(iid_view_choice(0, 7, torch.arange(3000), 3), minlength=3)  # one epoch, many samples
    assert counts.min() > 900 and counts.max() < 1100


def test_backends_that_cannot_gather_pool_rows_refuse_with_one_line() -> None:
    images, targets, pool = _pool_setup()
    with pytest.raises(FastmemError, match="--iid-views is supported by the device and torch pipelines, not 'dali'"):
        make_loader("dali", images, targets, batch_size=16, view_pool=pool)


RUN = ["--dataset", "fashion-mnist", "--subset", "512", "--probe-subset", "200", "--augment", "none",
       "--width", "0.25", "--bottleneck-dim", "256", "--batch-size", "128", "--device", "cpu", "--threads", "1",
       "--progress", "false"]


@pytest.mark.parametrize("pipeline", ["device", "torch"])
def test_a_tiny_run_with_iid_views_trains(tmp_path: Path, pipeline: str) -> None:
    out = tmp_path / pipeline
    result = run_module("fastmem.train", *RUN, "--pipeline", pipeline, "--iid-views", "2", "--epochs", "2",
                        "--probe-every", "-1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    records = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    assert json.loads((out / "config.json").read_text())["iid_views"] == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["--pipeline", "dali", "--iid-views", "2"], "--iid-views is supported by the device and torch pipelines"),
        (["--iid-views", "-1"], "--iid-views must be >= 0"),
        (["--subset", "0", "--iid-views", "1"], "--iid-views 1 needs"),
    ],
)
def test_bad_iid_view_flags_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_module("fastmem.train", *RUN, "--epochs", "1", "--out", str(tmp_path / "run"), *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "run" / "config.json").exists()
