"""Training targets per PROTOCOL.md: uniform random labels or partial noise, drawn once per run.

A fraction `label_noise` of the samples (exactly round(p·N), chosen by the seeded RNG) get a
uniform random class (not a permutation, so ~1/C of them agree with the truth by chance); the rest
keep their true label. Saved beside the run as labels.npz so probes and reports can recover them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastmem.data.npz import read_npz
from fastmem.errors import fail
from fastmem.io_utils import atomic_path


@dataclass(frozen=True)
class RunLabels:
    """True labels, the training targets, and which samples were redrawn."""

    true_labels: np.ndarray
    targets: np.ndarray
    corrupted: np.ndarray
    num_classes: int
    label_noise: float
    label_seed: int


def make_targets(true_labels: np.ndarray, num_classes: int, label_noise: float, label_seed: int) -> RunLabels:
    """Redraw a fraction `label_noise` of the labels uniformly at random, seeded by `label_seed`."""
    if not 0.0 <= label_noise <= 1.0:
        fail(f"--label-noise must be in [0, 1], got {label_noise}")
    true_labels = np.asarray(true_labels, dtype=np.int64)
    n = true_labels.shape[0]
    rng = np.random.default_rng(label_seed)
    corrupted = np.zeros(n, dtype=bool)
    corrupted[rng.permutation(n)[: int(round(label_noise * n))]] = True
    targets = true_labels.copy()
    targets[corrupted] = rng.integers(0, num_classes, size=int(corrupted.sum()))
    return RunLabels(true_labels, targets, corrupted, num_classes, float(label_noise), int(label_seed))


def save_labels(path: str | Path, labels: RunLabels) -> None:
    """Write labels.npz atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                true_labels=labels.true_labels,
                targets=labels.targets,
                corrupted=labels.corrupted,
                num_classes=np.int64(labels.num_classes),
                label_noise=np.float64(labels.label_noise),
                label_seed=np.int64(labels.label_seed),
            )


LABEL_ARRAYS: dict[str, str] = {"true_labels": "i", "targets": "i", "corrupted": "b", "num_classes": "i",
                                "label_noise": "f", "label_seed": "i"}


def load_labels(path: str | Path) -> RunLabels:
    """Read labels.npz written by `save_labels`; a truncated, garbage or foreign file is one line naming it
    (parsed by fastmem.data.npz: plain arrays only, sizes checked before anything is allocated)."""
    path = Path(path)
    arrays = read_npz(path, LABEL_ARRAYS, "labels file")
    true_labels, targets, corrupted = arrays["true_labels"], arrays["targets"], arrays["corrupted"]
    scalars = [arrays[name] for name in ("num_classes", "label_noise", "label_seed")]
    if true_labels.ndim != 1 or targets.shape != true_labels.shape or corrupted.shape != true_labels.shape \
            or any(a.shape != () for a in scalars):
        fail(f"{path}: arrays of inconsistent shapes (true_labels {true_labels.shape}, targets {targets.shape}, "
             f"corrupted {corrupted.shape}); not a labels file")
    num_classes, label_noise = int(arrays["num_classes"]), float(arrays["label_noise"])
    for name, values in (("true_labels", true_labels), ("targets", targets)):
        if values.size and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            fail(f"{path}: {name} outside 0..{num_classes - 1}; not a labels file")
    if num_classes < 1 or not 0.0 <= label_noise <= 1.0:
        fail(f"{path}: num_classes {num_classes} / label_noise {label_noise} out of range; not a labels file")
    return RunLabels(true_labels.astype(np.int64), targets.astype(np.int64), corrupted, num_classes, label_noise,
                     int(arrays["label_seed"]))
