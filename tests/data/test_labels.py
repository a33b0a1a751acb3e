"""Random and partially noisy labels follow PROTOCOL.md and round-trip through labels.npz."""

from __future__ import annotations

import numpy as np
import pytest

from fastmem.data.labels import load_labels, make_targets, save_labels
from fastmem.errors import FastmemError


def _truth(n: int = 50_000, classes: int = 10) -> np.ndarray:
    return np.arange(n) % classes


def test_fully_random_labels_are_uniform_draws_not_a_permutation() -> None:
    labels = make_targets(_truth(), 10, label_noise=1.0, label_seed=0)
    assert labels.corrupted.all()
    agree = (labels.targets == labels.true_labels).mean()
    assert abs(agree - 0.1) < 0.01  # ~1/C agree by chance
    counts = np.bincount(labels.targets, minlength=10)
    assert not np.all(counts == 5000)  # a permutation of balanced labels would keep counts exact
    # chi-square against uniform: 9 dof, 99.9% quantile ≈ 27.9
    chi2 = ((counts - 5000) ** 2 / 5000).sum()
    assert chi2 < 27.9


@pytest.mark.parametrize("noise", [0.0, 0.25, 0.5, 0.8])
def test_partial_noise_keeps_exactly_a_fraction_one_minus_p_true(noise: float) -> None:
    labels = make_targets(_truth(), 10, label_noise=noise, label_seed=3)
    n = labels.true_labels.size
    assert labels.corrupted.sum() == round(noise * n)
    kept = ~labels.corrupted
    assert np.array_equal(labels.targets[kept], labels.true_labels[kept])
    expected_agreement = (1 - noise) + noise / 10
    assert abs((labels.targets == labels.true_labels).mean() - expected_agreement) < 0.01


def test_labels_depend_only_on_the_seed() -> None:
    a = make_targets(_truth(1000), 10, 1.0, 7)
    b = make_targets(_truth(1000), 10, 1.0, 7)
    c = make_targets(_truth(1000), 10, 1.0, 8)
    assert np.array_equal(a.targets, b.targets)
    assert not np.array_equal(a.targets, c.targets)


def test_labels_round_trip_through_npz(tmp_path) -> None:
    labels = make_targets(_truth(1000), 10, 0.5, 1)
    save_labels(tmp_path / "labels.npz", labels)
    back = load_labels(tmp_path / "labels.npz")
    assert np.array_equal(back.targets, labels.targets)
    assert np.array_equal(back.true_labels, labels.true_labels)
    assert np.array_equal(back.corrupted, labels.corrupted)
    assert (back.num_classes, back.label_noise, back.label_seed) == (10, 0.5, 1)


def test_noise_outside_unit_interval_is_rejected() -> None:
    with pytest.raises(FastmemError, match="label-noise"):
        make_targets(_truth(10), 10, 1.5, 0)
