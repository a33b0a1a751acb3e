"""The linear probe (fastmem/probe/linear.py): scikit-learn's LogisticRegression as the oracle on real
Fashion-MNIST features of a briefly trained conv4, determinism, a separable set and label checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from fastmem.data import load_arrays
from fastmem.errors import FastmemError
from fastmem.models import create_model
from fastmem.probe import extract_embeddings
from fastmem.probe.linear import (
    DEFAULT_GRID,
    fit_linear_probe,
    heldout_split,
    linear_probe_predictions,
    normalize_rows,
    sklearn_C,
)

N_TRAIN, N_QUERY = 2000, 1000


def _sklearn(x: np.ndarray, y: np.ndarray, C: float) -> LogisticRegression:
    """The oracle, solved tightly on one BLAS thread (spinning OpenBLAS threads crawl on a busy machine)."""
    with threadpool_limits(1):
        model = LogisticRegression(C=C, tol=1e-8, max_iter=20000).fit(normalize_rows(x).numpy(), y)
    assert model.n_iter_.max() < 20000
    return model


def _clusters(n: int, dim: int, classes: int, spread: float, seed: int, *,
              query: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters around random centres: n float32 rows and their labels (then `query` more of each)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim))
    labels = rng.integers(0, classes, n + query)
    return (centres[labels] + spread * rng.standard_normal((n + query, dim))).astype(np.float32), labels


@pytest.fixture(scope="module")
def fmnist_features() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Two layers' embeddings of 3,000 Fashion-MNIST training images (2,000 fit + 1,000 query) from a
    conv4 after 30 SGD steps on the fit part."""
    try:
        data = load_arrays("fashion-mnist", "train")
    except FastmemError as err:
        pytest.skip(f"Fashion-MNIST is not installed here: {err}")
    rows = np.random.default_rng(0).choice(len(data), N_TRAIN + N_QUERY, replace=False)
    images, labels = data.images[rows], data.labels[rows].astype(np.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two spinning OpenMP threads crawl on a busy 2-core machine (30 s against 4 s)
    try:
        return _train_and_embed(images, labels), labels
    finally:
        torch.set_num_threads(threads)


def _train_and_embed(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    model = create_model("conv4", num_classes=10, in_channels=1, image_size=28, width=0.25, bottleneck_dim=256)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.from_numpy(images[:N_TRAIN]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(labels[:N_TRAIN])
    batches = torch.Generator().manual_seed(0)
    for _ in range(30):
        batch = torch.randint(0, N_TRAIN, (128,), generator=batches)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    embeddings = extract_embeddings(model, images, device=torch.device("cpu"), layers=("stage2", "head_hidden"))
    return {layer: e.vectors.astype(np.float32) for layer, e in embeddings.items()}


@pytest.mark.parametrize("layer", ["stage2", "head_hidden"])
def test_accuracy_matches_sklearn_at_the_chosen_regularisation(fmnist_features, layer: str) -> None:
    features, labels = fmnist_features
    train_x, query_x = features[layer][:N_TRAIN], features[layer][N_TRAIN:]
    train_y, query_y = labels[:N_TRAIN], labels[N_TRAIN:]
    predictions, info = linear_probe_predictions(train_x, train_y, query_x, 10, seed=0)
    assert predictions.shape == (N_QUERY,) and predictions.dtype == np.int64
    assert info["l2"] in DEFAULT_GRID and info["l2_grid"] == list(DEFAULT_GRID) and info["split_seed"] == 0
    assert len(info["heldout_accuracy"]) == len(DEFAULT_GRID) and info["n_heldout"] == N_TRAIN // 5
    assert info["converged"] and info["sklearn_C"] == pytest.approx(1 / (info["l2"] * N_TRAIN))
    oracle = _sklearn(train_x, train_y, info["sklearn_C"])
    ours = (predictions == query_y).mean()
    theirs = (oracle.predict(normalize_rows(query_x).numpy()) == query_y).mean()
    assert ours > 0.5  # a real feature, not chance
    assert abs(ours - theirs) <= 0.005, (layer, ours, theirs)


@pytest.mark.parametrize("classes", [2, 4])
def test_weights_equal_sklearn_under_the_documented_C(classes: int) -> None:
    """The λ ↔ C mapping itself: a well-conditioned problem solved by both lands on the same weights."""
    x, y = _clusters(400, 12, classes, 1.0, seed=classes)
    probe = fit_linear_probe(x, y, classes, l2_grid=(1e-2,))
    oracle = _sklearn(x, y, sklearn_C(1e-2, 400, classes))
    ours = probe.weight[1] - probe.weight[0] if classes == 2 else probe.weight  # sklearn's binary: w₁ − w₀
    np.testing.assert_allclose(ours, oracle.coef_.reshape(ours.shape), atol=1e-4)
    np.testing.assert_allclose(probe.logits(x).argmax(1), oracle.predict(normalize_rows(x).numpy()))


def test_same_seed_same_bits_and_a_stratified_heldout() -> None:
    x, y = _clusters(600, 16, 5, 2.0, seed=0)
    threads = torch.get_num_threads()
    a, b = fit_linear_probe(x, y, 5, seed=3), fit_linear_probe(x, y, 5, seed=3)
    assert torch.get_num_threads() == threads  # the solver's one thread is given back
    assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias) and a.info() == b.info()
    assert np.array_equal(a.predict(x), b.predict(x))
    fit, held = heldout_split(y, 3)
    assert np.array_equal(np.sort(np.concatenate([fit, held])), np.arange(600))
    for c in range(5):
        assert abs((y[held] == c).sum() - (y == c).sum() / 5) <= 1  # 20 % of every class, give or take a row
    assert not np.array_equal(held, heldout_split(y, 4)[1])


def test_separable_set_is_classified_perfectly() -> None:
    x, y = _clusters(500, 10, 4, 0.1, seed=1, query=200)
    probe = fit_linear_probe(x[:500], y[:500], 4)
    assert (probe.predict(x[:500]) == y[:500]).all() and (probe.predict(x[500:]) == y[500:]).all()
    spare = fit_linear_probe(x[:500], y[:500], 6)  # two classes without a row: never predicted, still converged
    assert spare.converged and (spare.predict(x[500:]) == y[500:]).all()


@pytest.mark.parametrize(("labels", "message"), [
    (np.zeros(10, dtype=np.float32), "1-D integer array"),
    (np.zeros((10, 1), dtype=np.int64), "1-D integer array"),
    (np.arange(10) % 3 - 1, r"labels must lie in \[0, 3\)"),
    (np.arange(10) % 4, r"labels must lie in \[0, 3\)"),
    (np.zeros(9, dtype=np.int64), "9 labels for 10 feature rows"),
])
def test_bad_labels_give_one_line(labels: np.ndarray, message: str) -> None:
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    with pytest.raises(FastmemError, match=message) as err:
        fit_linear_probe(x, labels, 3)
    assert "\n" not in str(err.value)


def test_bad_features_give_one_line() -> None:
    x, y = _clusters(50, 4, 3, 1.0, seed=0)
    for train_x, query_x, message in [(np.where(np.eye(50, 4) > 0, np.nan, x), x, "NaN or infinity"),
                                      (x[:, 0], x, "2-D array"), (x, x[:, :3], "3 dims, the probe was fitted on 4")]:
        with pytest.raises(FastmemError, match=message) as err:
            linear_probe_predictions(train_x, y, query_x, 3)
        assert "\n" not in str(err.value)
