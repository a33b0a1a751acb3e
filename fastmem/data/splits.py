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
    """The run's training images, its probe's reference and queries, and where the training images sit in
    the full split."""

    train: ArrayDataset
    test: ArrayDataset  # the probe queries
    full_train: ArrayDataset  # the whole training split (e.g. for i.i.d. views drawn from outside the subset)
    train_indices: np.ndarray  # int64 rows of `full_train` that make up `train`, in order
    reference: ArrayDataset  # the probe's k-NN reference, with the true labels: `train` unless probe_reference


# Independent streams of the data seed: one order of the training split (a subset of N is its first N rows,
# so smaller subsets lie inside larger ones and a fixed probe reference can be shared across N), and one of
# the test split (the probe queries do not depend on the subset).
_TRAIN_STREAM, _TEST_STREAM = 0, 1


def _first_of_order(total: int, count: int, seed: int, stream: int) -> np.ndarray:
    """The sorted first `count` rows of the seeded random order of `total` rows."""
    order = np.random.default_rng([seed, stream]).permutation(total)
    return np.sort(order[:count]).astype(np.int64)


def load_run_splits(
    dataset: str, data_dir: str | None, *, subset: int, probe_subset: int, image_size: int, seed: int,
    probe_reference: int = 0,
) -> RunSplits:
    """Seeded random subsets of the train and test splits, with the training subset's row indices.

    `seed` is the data seed: the subset, the queries and the probe reference depend on it alone.
    `probe_reference` > 0: the probe's reference is the first that many rows of the training order
    (a superset of every smaller training subset of the same seed) instead of the training images.
    """
    size = image_size or None
    synthetic_size = max(subset, probe_reference) or 5000
    full_train = load_arrays(dataset, "train", data_dir, image_size=size, synthetic_size=synthetic_size)
    test = load_arrays(dataset, "test", data_dir, image_size=size, synthetic_size=synthetic_size)
    for knob, count in (("--subset", subset), ("--probe-reference", probe_reference)):
        if count > len(full_train):
            fail(f"{knob} {count} exceeds the {len(full_train)} training images of {dataset}")
    train_indices = np.arange(len(full_train), dtype=np.int64)
    if subset:
        train_indices = _first_of_order(len(full_train), subset, seed, _TRAIN_STREAM)
    train = full_train.subset(train_indices) if subset else full_train
    reference = train
    if probe_reference:
        reference = full_train.subset(_first_of_order(len(full_train), probe_reference, seed, _TRAIN_STREAM))
    if probe_subset and probe_subset < len(test):
        test = test.subset(_first_of_order(len(test), probe_subset, seed, _TEST_STREAM))
    return RunSplits(train, test, full_train, train_indices, reference)


def select_run_data(
    dataset: str, data_dir: str | None, *, subset: int, probe_subset: int, image_size: int, seed: int,
    probe_reference: int = 0,
) -> tuple[ArrayDataset, ArrayDataset]:
    """(the probe's reference images, its query images) of a run's data choices (load_run_splits)."""
    splits = load_run_splits(dataset, data_dir, subset=subset, probe_subset=probe_subset, image_size=image_size,
                             seed=seed, probe_reference=probe_reference)
    return splits.reference, splits.test
