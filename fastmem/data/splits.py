"""The images a run trains on and probes with, rebuilt from its config alone.

Owns the seeded choice of the training subset and the probe queries, so the trainer and the probe
CLI always see the same samples for the same config.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastmem.data import ArrayDataset, load_arrays
from fastmem.errors import fail


@dataclass(frozen=True)
class RunSplits:
    """The run's training images, its probe queries, and where the training images sit in the full split."""

    train: ArrayDataset
    test: ArrayDataset
    full_train: ArrayDataset  # the whole training split (e.g. for i.i.d. views drawn from outside the subset)
    train_indices: np.ndarray  # int64 rows of `full_train` that make up `train`, in order


def load_run_splits(
    dataset: str, data_dir: str | None, *, subset: int, probe_subset: int, image_size: int, seed: int
) -> RunSplits:
    """Seeded random subsets of the train and test splits, with the training subset's row indices."""
    size = image_size or None
    synthetic_size = subset or 5000
    full_train = load_arrays(dataset, "train", data_dir, image_size=size, synthetic_size=synthetic_size)
    test = load_arrays(dataset, "test", data_dir, image_size=size, synthetic_size=synthetic_size)
    rng = np.random.default_rng(seed)
    train_indices = np.arange(len(full_train), dtype=np.int64)
    if subset:
        if subset > len(full_train):
            fail(f"--subset {subset} exceeds the {len(full_train)} training images of {dataset}")
        train_indices = np.sort(rng.choice(len(full_train), subset, replace=False)).astype(np.int64)
    train = full_train.subset(train_indices) if subset else full_train
    if probe_subset and probe_subset < len(test):
        test = test.subset(np.sort(rng.choice(len(test), probe_subset, replace=False)))
    return RunSplits(train, test, full_train, train_indices)


def select_run_data(
    dataset: str, data_dir: str | None, *, subset: int, probe_subset: int, image_size: int, seed: int
) -> tuple[ArrayDataset, ArrayDataset]:
    """(training images, probe query images): seeded random subsets of the train and test splits."""
    splits = load_run_splits(dataset, data_dir, subset=subset, probe_subset=probe_subset, image_size=image_size,
                             seed=seed)
    return splits.train, splits.test
