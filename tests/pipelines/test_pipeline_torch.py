"""The torch pipeline honours the loader contract: shapes, range, layout, order, determinism, workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastmem.pipelines import AUGMENT_NAMES, make_loader

from fastmem.errors import FastmemError


def _images(n: int = 100, size: int = 12, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


@pytest.mark.parametrize("augment", AUGMENT_NAMES)
@pytest.mark.parametrize("channels", [1, 3])
def test_batches_are_float_unit_range_channels_last_with_indices(augment: str, channels: int) -> None:
    images = _images(channels=channels)
    targets = np.arange(100) % 10
    loader = make_loader("torch", images, targets, augment=augment, batch_size=32, seed=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 3  # drop_last
    for batch in batches:
        assert batch.images.shape == (32, channels, 12, 12) and batch.images.dtype == torch.float32
        assert batch.images.is_contiguous(memory_format=torch.channels_last)
        assert 0.0 <= float(batch.images.min()) and float(batch.images.max()) <= 1.0
        assert torch.equal(batch.targets, torch.as_tensor(targets)[batch.indices])
        assert torch.equal(batch.view_ids, torch.zeros(32, dtype=torch.int64))  # epoch 0 (none: always 0)
    seen = torch.cat([b.indices for b in batches])
    assert len(set(seen.tolist())) == 96


def test_no_augmentation_returns_the_raw_pixels_scaled() -> None:
    images = _images()
    batch = next(iter(make_loader("torch", images, np.zeros(100, dtype=np.int64), augment="none", batch_size=10)))
    expected = torch.from_numpy(images[batch.indices.numpy()]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(batch.images, expected)


def test_epochs_are_reproducible_and_differ_from_each_other() -> None:
    def epoch(seed: int, e: int) -> list:
        loader = make_loader("torch", _images(), np.zeros(100, dtype=np.int64), augment="full", batch_size=25, seed=seed)
        loader.set_epoch(e)
        return list(loader)

    a, b, c = epoch(0, 3), epoch(0, 3), epoch(0, 4)
    assert all(torch.equal(x.images, y.images) and torch.equal(x.indices, y.indices) for x, y in zip(a, b))
    assert not torch.equal(a[0].indices, c[0].indices)


def test_fewer_samples_than_a_batch_is_a_user_error() -> None:
    with pytest.raises(FastmemError, match="fewer than one batch"):
        make_loader("torch", _images(10), np.zeros(10, dtype=np.int64), batch_size=32)


def test_unknown_pipeline_is_a_user_error() -> None:
    with pytest.raises(FastmemError, match="unknown pipeline 'nope'"):
        make_loader("nope", _images(), np.zeros(100, dtype=np.int64))


def test_worker_processes_yield_the_same_batches_as_the_main_process() -> None:
    def epoch(workers: int) -> list:
        loader = make_loader("torch", _images(), np.arange(100) % 10, augment="full", batch_size=25, seed=4, workers=workers)
        loader.set_epoch(2)
        return list(loader)

    for a, b in zip(epoch(0), epoch(2), strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
        assert torch.equal(a.view_ids, torch.full((25,), 2))
