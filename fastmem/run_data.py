"""The images a run trains on and probes with, rebuilt from its config alone.

Owns the seeded choice of the training subset and the probe queries, so the trainer and the probe
CLI always see the same samples for the same config.
"""

from __future__ import annotations

import numpy as np

from fastmem.data import ArrayDataset, load_arrays
from fastmem.errors import fail


def select_run_data(
    dataset: str, data_dir: str | None, *, subset: int, probe_subset: int, image_size: int, seed: int
) -> tuple[ArrayDataset, ArrayDataset]:
    """(training images, probe query images): seeded random subsets of the train and test splits."""
    size = image_size or None
    synthetic_size = subset or 5000
    train = load_arrays(dataset, "train", data_dir, image_size=size, synthetic_size=synthetic_size)
    test = load_arrays(dataset, "test", data_dir, image_size=size, synthetic_size=synthetic_size)
    rng = np.random.default_rng(seed)
    if subset:
        if subset > len(train):
            fail(f"--subset {subset} exceeds the {len(train)} training images of {dataset}")
        train = train.subset(np.sort(rng.choice(len(train), subset, replace=False)))
    if probe_subset and probe_subset < len(test):
        test = test.subset(np.sort(rng.choice(len(test), probe_subset, replace=False)))
    return train, test
