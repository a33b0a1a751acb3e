"""The torch cosine k-NN agrees with scikit-learn's brute-force cosine k-NN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastmem.kernels import knn_classify, knn_topk
from fastmem.kernels.knn_torch import knn_topk as knn_topk_torch
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, 24))
    labels = rng.integers(0, 5, 3000)
    reference = centres[labels] + 1.5 * rng.normal(size=(3000, 24))
    query_labels = rng.integers(0, 5, 500)
    queries = centres[query_labels] + 1.5 * rng.normal(size=(500, 24))
    return reference.astype(np.float32), labels, queries.astype(np.float32)


def test_topk_neighbours_match_sklearn_across_blocks() -> None:
    reference, _, queries = _data()
    sim, idx = knn_topk_torch(torch.from_numpy(reference), torch.from_numpy(queries), 20, block_size=700)
    nn = NearestNeighbors(n_neighbors=20, metric="cosine", algorithm="brute").fit(reference)
    dist, expected = nn.kneighbors(queries)
    assert np.array_equal(idx.numpy(), expected)
    np.testing.assert_allclose(sim.numpy(), 1 - dist, atol=1e-5)


def test_majority_vote_matches_sklearn_classifier() -> None:
    reference, labels, queries = _data(1)
    predicted = knn_classify(torch.from_numpy(reference), torch.from_numpy(labels), torch.from_numpy(queries), k=20)
    clf = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute").fit(reference, labels)
    assert np.array_equal(predicted.numpy(), clf.predict(queries))


def test_weighted_vote_uses_exp_similarity_over_temperature() -> None:
    reference, labels, queries = _data(2)
    ref, qry = torch.from_numpy(reference), torch.from_numpy(queries)
    predicted = knn_classify(ref, torch.from_numpy(labels), qry, k=10, vote="weighted", temperature=0.07)
    sim, idx = knn_topk(ref, qry, 10)
    scores = np.zeros((len(queries), 5))
    for q in range(len(queries)):
        for s, i in zip(sim[q].numpy(), idx[q].numpy()):
            scores[q, labels[i]] += np.exp(s / 0.07)
    assert np.array_equal(predicted.numpy(), scores.argmax(1))


def test_vote_ties_go_to_the_smaller_class() -> None:
    reference = torch.tensor([[1.0, 0.0], [1.0, 0.01], [1.0, -0.01], [1.0, 0.02]])
    labels = torch.tensor([3, 1, 1, 3])
    predicted = knn_classify(reference, labels, torch.tensor([[1.0, 0.0]]), k=4)
    assert predicted.tolist() == [1]


def test_k_below_one_is_a_user_error() -> None:
    from fastmem.errors import FastmemError

    reference, labels, queries = _data()
    with pytest.raises(FastmemError, match="k must be >= 1"):
        knn_classify(torch.from_numpy(reference), torch.from_numpy(labels), torch.from_numpy(queries), k=0)


def test_k_beyond_the_reference_set_lets_every_reference_vote() -> None:
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    sim, idx = knn_topk(reference, torch.tensor([[1.0, 0.05]]), 10, backend="torch")
    assert idx.tolist() == [[0, 2, 1]]
    assert knn_classify(reference, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0]]), k=10).tolist() == [1]
