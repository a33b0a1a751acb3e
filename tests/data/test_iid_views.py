"""Experiment G's i.i.d. views: the reserved-image table, the shared class pools (--iid-views -1), the loaders
that show them, and training runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUICK_RUN, run_module
from fastmem.pipelines import ViewPool, make_loader
from fastmem.pipelines.view_pool import iid_view_choice, shown_pool_rows

from fastmem.data.iid_views import (
    SHARED_VIEWS,
    build_iid_view_pool,
    check_view_pool,
    reserve_same_class_images,
    share_same_class_images,
)
from fastmem.data.splits import RunSplits, load_run_splits
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
        (["--iid-views", "-2"], "--iid-views must be >= 0, or -1 for all same-class images, got -2"),
        (["--subset", "0", "--iid-views", "1"], "--iid-views 1 needs"),
    ],
)
def test_bad_iid_view_flags_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_module("fastmem.train", *RUN, "--epochs", "1", "--out", str(tmp_path / "run"), *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "run" / "config.json").exists()


# --iid-views -1: every image of the anchor's true class outside the subset, one pool shared by the class ----


def test_shared_spans_hold_every_free_same_class_image_once_and_anchors_of_a_class_share_one() -> None:
    labels = _labels()
    anchors = np.sort(np.random.default_rng(1).choice(len(labels), 100, replace=False))
    members, starts, counts = share_same_class_images(labels, anchors)
    assert members.dtype == starts.dtype == counts.dtype == np.int64
    assert len(np.unique(members)) == len(members) and not np.isin(members, anchors).any()  # once each, never an anchor
    for n, anchor in enumerate(anchors):
        span = members[starts[n]:starts[n] + counts[n]]
        free = np.flatnonzero((labels == labels[anchor]) & ~np.isin(np.arange(len(labels)), anchors))
        assert np.array_equal(span, free)  # all of its class's free images, in split order
    for cls in np.unique(labels[anchors]):  # one span per class, shared by its anchors
        assert len(np.unique(starts[labels[anchors] == cls])) == 1
    assert len(members) == int(np.isin(labels, labels[anchors]).sum()) - len(anchors)
    again = share_same_class_images(labels, anchors)
    assert all(np.array_equal(a, b) for a, b in zip(again, (members, starts, counts)))  # a pure function


def test_a_class_with_no_image_outside_the_subset_is_one_clear_error() -> None:
    labels = np.array([0] * 10 + [1] * 2)
    with pytest.raises(FastmemError, match=r"--iid-views -1 needs training images of class 'b'.*all 2 are among them"):
        share_same_class_images(labels, np.array([0, 10, 11]), ("a", "b"))


def test_spans_draw_uniformly_over_each_samples_whole_run_whatever_its_length() -> None:
    rows, counts = torch.tensor([[0], [3], [3], [10]]), torch.tensor([3, 7, 7, 2])  # unequal runs, one shared
    epochs = 7000
    shown = torch.stack([shown_pool_rows(rows, 5, epoch, torch.arange(4), counts) for epoch in range(epochs)])
    for n in range(4):
        hits = torch.bincount(shown[:, n] - rows[n, 0], minlength=int(counts[n]))
        assert len(hits) == counts[n]  # never outside the run
        expected = epochs / int(counts[n])
        assert float((hits - expected).abs().max()) < 0.1 * expected  # every image of the run, equally often
    assert not torch.equal(shown[:, 1], shown[:, 2])  # a shared run, drawn independently per sample


def test_check_view_pool_refuses_spans_outside_the_pool() -> None:
    images = np.zeros((10, 4, 4, 1), dtype=np.uint8)
    check_view_pool(ViewPool(images, np.array([[0], [4]]), np.array([4, 6])), 2, (4, 4, 1))
    with pytest.raises(FastmemError, match="view pool spans must be non-empty runs of its 10 images"):
        check_view_pool(ViewPool(images, np.array([[0], [5]]), np.array([4, 6])), 2, (4, 4, 1))
    with pytest.raises(FastmemError, match="view pool spans must be non-empty runs"):
        check_view_pool(ViewPool(images, np.array([[0], [4]]), np.array([4, 0])), 2, (4, 4, 1))
    with pytest.raises(FastmemError, match=r"view pool spans must be rows \(samples=2, 1\) and counts \(2,\)"):
        check_view_pool(ViewPool(images, np.array([[0, 1], [4, 5]]), np.array([4, 6])), 2, (4, 4, 1))


SHARED_SUBSET = 2000  # ~200 anchors of each Fashion-MNIST class, ~5,800 free images of each


@pytest.fixture(scope="module")
def shared() -> tuple[RunSplits, ViewPool]:
    splits = load_run_splits("fashion-mnist", None, subset=SHARED_SUBSET, probe_subset=100, image_size=0, seed=0)
    return splits, build_iid_view_pool(splits, SHARED_VIEWS, seed=0)


def _free_images_of(splits: RunSplits, cls: int) -> np.ndarray:
    full = splits.full_train
    return np.setdiff1d(np.flatnonzero(full.labels == cls), splits.train_indices)


def test_the_shared_pool_stores_each_free_image_once_with_a_span_per_anchor(shared) -> None:
    splits, pool = shared
    full, anchor_classes = splits.full_train, splits.train.labels
    free = {int(cls): _free_images_of(splits, cls) for cls in np.unique(anchor_classes)}
    assert pool.images.dtype == np.uint8 and len(pool.images) == sum(len(f) for f in free.values())  # once, not per anchor
    assert pool.rows.shape == (SHARED_SUBSET, 1) and pool.counts.shape == (SHARED_SUBSET,)
    assert pool.rows.nbytes + pool.counts.nbytes == SHARED_SUBSET * 16  # not an (N, ~5,800) table
    for cls, images in free.items():
        mine = anchor_classes == cls
        start, count = int(pool.rows[mine, 0][0]), int(pool.counts[mine][0])
        assert np.all(pool.rows[mine, 0] == start) and np.all(pool.counts[mine] == count)  # shared by the class
        assert count == len(images) > 5000 and np.array_equal(pool.images[start:start + count], full.images[images])
    assert pool.views_per_sample == min(len(f) for f in free.values())
    check_view_pool(pool, SHARED_SUBSET, tuple(splits.train.images.shape[1:]))


def _pixels(batch_images: torch.Tensor) -> torch.Tensor:
    """The uint8 NHWC pixels an augment-none batch shows (its images are pixels / 255)."""
    return (batch_images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _rows_by_pixels(splits: RunSplits) -> dict[bytes, list[int]]:
    """The rows of the full training split with exactly these pixels (a few Fashion-MNIST images repeat)."""
    where: dict[bytes, list[int]] = {}
    for row, image in enumerate(splits.full_train.images):
        where.setdefault(image.tobytes(), []).append(row)
    return where


def test_every_shared_view_is_a_free_image_of_its_true_class_and_covers_far_more_than_disjoint_views(shared) -> None:
    splits, pool = shared
    train, full = splits.train, splits.full_train
    is_anchor = np.zeros(len(full.labels), dtype=bool)
    is_anchor[splits.train_indices] = True
    loader = make_loader("device", train.images, train.labels, augment="none", batch_size=500, seed=3, view_pool=pool)
    where, seen = _rows_by_pixels(splits), [set() for _ in range(SHARED_SUBSET)]
    for epoch in range(1, 65):
        loader.set_epoch(epoch)
        for batch in loader:
            shown = [where[image.tobytes()] for image in _pixels(batch.images).numpy()]
            for anchor, rows in zip(batch.indices.tolist(), shown):
                ok = [r for r in rows if full.labels[r] == train.labels[anchor] and not is_anchor[r]]
                assert ok, f"anchor {anchor} showed an image that is not a free image of its class"
                seen[anchor].add(ok[0])
    for cls in np.unique(train.labels):
        mine = np.flatnonzero(train.labels == cls)
        most_disjoint = len(_free_images_of(splits, cls)) // len(mine)  # the largest M disjoint views allow (~29)
        distinct = [len(seen[n]) for n in mine]
        assert min(distinct) > 1.5 * most_disjoint  # each anchor alone: ~64 distinct images in 64 loads
        images = [image for n in mine for image in seen[n]]  # each anchor's distinct images, all anchors
        assert len(set(images)) < len(images), "no image shown by two anchors of one class: pool not shared"


def _head_pool(splits: RunSplits, pool: ViewPool, n: int) -> tuple[np.ndarray, np.ndarray, ViewPool]:
    """The first n anchors with their spans of the (whole) shared pool: a smaller loader for the torch backend."""
    return splits.train.images[:n], splits.train.labels[:n], ViewPool(pool.images, pool.rows[:n], pool.counts[:n])


def test_device_and_torch_loaders_show_identical_shared_views(shared) -> None:
    splits, pool = shared
    images, targets, head = _head_pool(splits, pool, 512)
    for augment, epochs in (("none", (1, 2)), ("full", (5,))):
        batches = {}
        for pipeline in ("device", "torch"):
            loader = make_loader(pipeline, images, targets, augment=augment, batch_size=128, seed=11, view_pool=head)
            batches[pipeline] = []
            for epoch in epochs:
                loader.set_epoch(epoch)
                batches[pipeline] += list(loader)
        assert len(batches["device"]) == len(batches["torch"]) == 4 * len(epochs)
        for a, b in zip(batches["device"], batches["torch"]):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.targets, b.targets)
            if augment == "none":  # the same pool image, exactly; scaled alike up to the executors' last bit
                assert torch.equal(_pixels(a.images), _pixels(b.images))
                assert torch.allclose(a.images, b.images, rtol=0, atol=1e-6)
            else:  # fused vs reference executor on the same pixels
                assert (a.images - b.images).abs().mean() < 1e-3


def _quick_fashion_mnist_run() -> list[str]:
    """QUICK_RUN on Fashion-MNIST (its own 28 px: no --image-size)."""
    args = list(QUICK_RUN)
    del args[args.index("--image-size"):args.index("--image-size") + 2]
    args[args.index("--dataset") + 1] = "fashion-mnist"
    return args


def test_a_short_run_with_shared_iid_views_trains(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = _quick_fashion_mnist_run()
    assert args[args.index("--subset") + 1] == "256"
    result = run_module("fastmem.train", *args, "--iid-views", "-1", "--augment", "none", "--pipeline", "device",
                        "--epochs", "2", "--probe-every", "-1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    records = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    assert json.loads((out / "config.json").read_text())["iid_views"] == -1
