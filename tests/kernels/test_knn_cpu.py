"""The exact CPU k-NN (int8/bf16 screen + fp32 re-rank) agrees with scikit-learn and with brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastmem.kernels import knn_cpu
from fastmem.kernels.knn_cpu import KnnCpuStats, knn_topk_cpu, resolve_precision
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from fastmem.errors import FastmemError

SCREENS = ["bf16", pytest.param("int8", marks=pytest.mark.skipif(
    not knn_cpu._int8_available(), reason="needs a CPU with VNNI and oneDNN"))]
PRECISIONS = ["fp32", *SCREENS, "auto"]


def _unit64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def _brute_force(reference: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 top-k with the tie rule: larger similarity first, then the smaller index."""
    sims = _unit64(queries) @ _unit64(reference).T
    # A BLAS GEMM may round identical columns differently: ties are equal to 1e-12 here.
    order = np.array([np.lexsort((np.arange(sims.shape[1]), -np.round(row, 12)))[:k] for row in sims])
    return np.take_along_axis(sims, order, 1), order


def _assert_neighbours(idx: torch.Tensor, reference: np.ndarray, queries: np.ndarray, expected: np.ndarray,
                       tol: float) -> None:
    """Same indices as `expected`, except swaps among neighbours whose float64 similarities differ by < tol."""
    sims = _unit64(queries) @ _unit64(reference).T
    ours = np.take_along_axis(sims, idx.numpy(), 1)
    theirs = np.take_along_axis(sims, expected, 1)
    np.testing.assert_allclose(ours, theirs, atol=tol, rtol=0)
    differ = idx.numpy() != expected
    assert not differ.any() or np.abs(ours - theirs)[differ].max() < tol


def _clusters(seed: int, n_ref: int, n_query: int, dim: int, spread: float) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, dim))
    labels = rng.integers(0, 5, n_ref)
    reference = centres[labels] + spread * rng.normal(size=(n_ref, dim))
    query_labels = rng.integers(0, 5, n_query)
    queries = centres[query_labels] + spread * rng.normal(size=(n_query, dim))
    return reference.astype(np.float32), labels, queries.astype(np.float32), query_labels


def _majority(labels: np.ndarray, idx: torch.Tensor, classes: int) -> np.ndarray:
    """Unweighted vote over the neighbours' labels; a tie goes to the smaller class."""
    votes = np.zeros((idx.shape[0], classes), dtype=np.int64)
    np.add.at(votes, (np.arange(idx.shape[0])[:, None], labels[idx.numpy()]), 1)
    return votes.argmax(1)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_topk_matches_sklearn_on_random_data_across_chunks_and_blocks(precision: str) -> None:
    reference, _, queries, _ = _clusters(0, 3001, 301, 48, 1.5)
    stats = KnnCpuStats()
    sims, idx = knn_topk_cpu(torch.from_numpy(reference), torch.from_numpy(queries), 20, precision=precision,
                             query_block=64, reference_chunk=700, stats=stats)
    dist, expected = NearestNeighbors(n_neighbors=20, metric="cosine", algorithm="brute").fit(
        reference.astype(np.float64)).kneighbors(queries.astype(np.float64))
    _assert_neighbours(idx, reference, queries, expected, tol=1e-6)
    np.testing.assert_allclose(sims.numpy(), 1 - dist, atol=1e-6)
    assert idx.dtype == torch.int64 and sims.dtype == torch.float32
    assert stats.fallback_queries == 0 and stats.precision == resolve_precision(precision)
    if stats.precision != "fp32":  # the screen kept a small multiple of k, not everything
        assert 20 * 301 <= stats.candidates < 0.2 * 3001 * 301


@pytest.mark.parametrize("precision", PRECISIONS)
def test_majority_vote_on_topk_matches_sklearn_classifier(precision: str) -> None:
    reference, labels, queries, _ = _clusters(1, 2500, 400, 24, 1.5)
    _, idx = knn_topk_cpu(torch.from_numpy(reference), torch.from_numpy(queries), 20, precision=precision)
    clf = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute").fit(reference.astype(np.float64), labels)
    assert np.array_equal(_majority(labels, idx, 5), clf.predict(queries.astype(np.float64)))


def test_fashion_mnist_pixel_accuracy_matches_sklearn_to_the_last_sample() -> None:
    from fastmem.data import load_arrays

    try:
        ds = load_arrays("fashion-mnist", "train")
    except FastmemError:
        pytest.skip("Fashion-MNIST is not installed")
    pixels = ds.images.reshape(len(ds), -1).astype(np.float32)
    reference, ref_labels, queries, query_labels = pixels[:20000], ds.labels[:20000], pixels[-2000:], ds.labels[-2000:]
    stats = KnnCpuStats()
    _, idx = knn_topk_cpu(torch.from_numpy(reference), torch.from_numpy(queries), 20, stats=stats)
    clf = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute").fit(reference, ref_labels)
    expected = clf.kneighbors(queries, return_distance=False)
    predicted, theirs = _majority(ref_labels, idx, 10), clf.predict(queries)
    assert (predicted == query_labels).sum() == (theirs == query_labels).sum()
    assert np.array_equal(predicted, theirs)
    # Swaps only among neighbours tied to fp32 rounding (784 terms: ~1e-6 apart at most).
    _assert_neighbours(idx, reference, queries, expected, tol=2e-6)
    assert stats.fallback_queries <= 0.005 * len(queries)  # a few queries with > 2048 candidates go to fp32


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(("n_ref", "n_query", "dim", "k"), [
    (1, 1, 3, 1), (7, 5, 3, 7), (64, 1, 1, 64), (1000, 37, 5, 1), (4097, 130, 33, 20), (130, 9, 16, 130),
])
def test_odd_sizes_match_brute_force(precision: str, n_ref: int, n_query: int, dim: int, k: int) -> None:
    rng = np.random.default_rng(n_ref + dim)
    reference = rng.normal(size=(n_ref, dim)).astype(np.float32)
    queries = rng.normal(size=(n_query, dim)).astype(np.float32)
    sims, idx = knn_topk_cpu(torch.from_numpy(reference), torch.from_numpy(queries), k, precision=precision,
                             query_block=50, reference_chunk=1000)
    expected_sims, expected = _brute_force(reference, queries, k)
    _assert_neighbours(idx, reference, queries, expected, tol=1e-6)
    np.testing.assert_allclose(sims.numpy(), expected_sims, atol=1e-6)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_duplicates_and_exact_ties_go_to_the_smaller_index(precision: str) -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(size=(300, 16)).astype(np.float32)
    # Copies at scattered positions, some scaled by powers of two (normalization gives the same bits).
    reference = np.concatenate([base, base[::-1] * 2, base[:100] * 0.5, base[:50]])[rng.permutation(750)]
    queries = np.concatenate([base[:40], rng.normal(size=(40, 16)).astype(np.float32)])
    sims, idx = knn_topk_cpu(torch.from_numpy(reference), torch.from_numpy(queries), 9, precision=precision)
    _, expected = _brute_force(reference, queries, 9)
    assert np.array_equal(idx.numpy(), expected)
    same = sims[:, 1:] == sims[:, :-1]  # exact fp32 ties must list ascending indices
    assert (idx[:, 1:][same] > idx[:, :-1][same]).all() and same.sum() > 100


def test_re_rank_gives_a_row_the_same_bits_in_every_slot_of_four() -> None:
    # The fp32 re-rank scores four rows at once: a duplicate's value must not depend on its slot.
    from fastmem.kernels.knn_cpu_screen import _similarities

    rng = np.random.default_rng(5)
    x, q = rng.normal(size=(6, 515)).astype(np.float32), rng.normal(size=(2, 515)).astype(np.float32)
    inv, out, seen = (1 / np.linalg.norm(x, axis=1)).astype(np.float32), np.empty(4, np.float32), {}
    for _ in range(200):
        four = rng.integers(0, 6, size=4)
        _similarities(q, 1, x, four, inv, out)
        for c, v in zip(four.tolist(), out.tolist(), strict=True):
            assert seen.setdefault(c, v) == v


@pytest.mark.parametrize("precision", PRECISIONS)
def test_zero_vectors_have_similarity_zero_not_nan(precision: str) -> None:
    rng = np.random.default_rng(4)
    reference = rng.normal(size=(200, 8)).astype(np.float32)
    reference[[3, 50, 51]] = 0
    queries = rng.normal(size=(6, 8)).astype(np.float32)
    queries[2] = 0
    sims, idx = knn_topk_cpu(torch.from_numpy(reference), torch.from_numpy(queries), 200, precision=precision)
    assert torch.isfinite(sims).all()
    assert torch.equal(idx[2], torch.arange(200)) and (sims[2] == 0).all()  # a zero query ties with all
    for row in (0, 1, 3):
        zero_refs = torch.isin(idx[row], torch.tensor([3, 50, 51]))
        assert (sims[row][zero_refs] == 0).all()
    _, expected = _brute_force(reference, queries, 200)
    assert np.array_equal(idx.numpy(), expected)


@pytest.mark.parametrize("precision", SCREENS)
def test_tight_clusters_fall_back_to_fp32_and_stay_exact(precision: str) -> None:
    # Near-duplicates within the screen's error bound: the candidate set explodes past the limit.
    reference, _, queries, _ = _clusters(5, 6000, 200, 32, 1e-4)  # ~1200 per cluster, limit 1024
    stats = KnnCpuStats()
    sims, idx = knn_topk_cpu(torch.from_numpy(reference), torch.from_numpy(queries), 20, precision=precision,
                             candidate_limit=1024, stats=stats)
    assert stats.fallback_queries == 200
    expected_sims, expected = _brute_force(reference, queries, 20)
    _assert_neighbours(idx, reference, queries, expected, tol=1e-6)
    # Forced with a small limit on ordinary data: the fp32 path gives the same answer as the screen.
    reference, _, queries, _ = _clusters(6, 2000, 150, 32, 1.0)
    forced = KnnCpuStats()
    forced_result = knn_topk_cpu(torch.from_numpy(reference), torch.from_numpy(queries), 10, precision=precision,
                                 query_block=64, candidate_limit=11, stats=forced)
    screened = knn_topk_cpu(torch.from_numpy(reference), torch.from_numpy(queries), 10, precision=precision)
    assert forced.fallback_queries > 0 and torch.equal(forced_result[1], screened[1])
    torch.testing.assert_close(forced_result[0], screened[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("precision", SCREENS)
def test_screens_agree_with_the_fp32_path_on_half_precision_inputs(precision: str) -> None:
    reference, _, queries, _ = _clusters(7, 5000, 256, 64, 2.0)
    ref16, qry16 = torch.from_numpy(reference).to(torch.bfloat16), torch.from_numpy(queries).half()
    exact_sims, exact_idx = knn_topk_cpu(ref16, qry16, 20, precision="fp32")
    sims, idx = knn_topk_cpu(ref16, qry16, 20, precision=precision)
    assert torch.equal(idx, exact_idx)
    torch.testing.assert_close(sims, exact_sims, atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [15, 37])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_many_small_chunks_stay_exact_as_tau_grows(precision: str, k: int) -> None:
    # Chunks of 16 columns (the last one partial): tau grows tile by tile, candidate buffers (limit
    # 400) are compacted many times; queries sorted against a trend. k = 37 needs three tiles to
    # fill a heap: every column of the first two is kept (no tau yet).
    reference, _, queries, _ = _clusters(8, 6001, 100, 32, 1.5)
    reference = reference * np.linspace(1, 3, 6001, dtype=np.float32)[:, None]
    stats = KnnCpuStats()
    sims, idx = knn_topk_cpu(torch.from_numpy(reference), torch.from_numpy(queries), k, precision=precision,
                             reference_chunk=16, query_block=32, candidate_limit=400, stats=stats)
    expected_sims, expected = _brute_force(reference, queries, k)
    _assert_neighbours(idx, reference, queries, expected, tol=1e-6)
    np.testing.assert_allclose(sims.numpy(), expected_sims, atol=1e-6)
    assert stats.fallback_queries == 0


def test_fp32_matmul_precision_is_forced_and_restored() -> None:
    reference, _, queries, _ = _clusters(9, 1000, 50, 32, 1.5)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # would allow bf16 GEMMs inside an fp32 path
    try:
        _, idx = knn_topk_cpu(torch.from_numpy(reference), torch.from_numpy(queries), 10, precision="fp32")
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    _, expected = _brute_force(reference, queries, 10)
    _assert_neighbours(idx, reference, queries, expected, tol=1e-6)


@pytest.mark.parametrize(("k", "ref_shape", "query_shape", "precision"), [
    (0, (10, 4), (2, 4), "auto"), (11, (10, 4), (2, 4), "auto"), (3, (10, 4), (2, 5), "auto"),
    (3, (10,), (2, 4), "auto"), (3, (10, 4), (2, 4), "fp16"),
])
def test_bad_arguments_are_user_errors(k: int, ref_shape: tuple[int, ...], query_shape: tuple[int, ...],
                                       precision: str) -> None:
    with pytest.raises(FastmemError):
        knn_topk_cpu(torch.ones(ref_shape), torch.ones(query_shape), k, precision=precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_worker_threads_give_the_same_answer_as_one_thread(precision: str) -> None:
    reference, _, queries, _ = _clusters(10, 3000, 333, 40, 1.5)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = knn_topk_cpu(torch.from_numpy(reference), torch.from_numpy(queries), 12, precision=precision, query_block=48)
        torch.set_num_threads(2)
        stats = KnnCpuStats()
        two = knn_topk_cpu(torch.from_numpy(reference), torch.from_numpy(queries), 12, precision=precision,
                           query_block=48, candidate_limit=40, stats=stats)  # some rows fall back, from workers
        assert torch.get_num_threads() == 2  # restored after the workers' one-thread GEMMs
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one[1], two[1]) and torch.equal(one[0], two[0])
    _, expected = _brute_force(reference, queries, 12)
    _assert_neighbours(one[1], reference, queries, expected, tol=1e-6)


def test_cpus_without_int8_fall_back_to_bf16_or_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knn_cpu, "_int8_available", lambda: False)
    monkeypatch.setattr(knn_cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    assert resolve_precision("auto") == "fp32"
    with pytest.raises(FastmemError):
        resolve_precision("int8")
    monkeypatch.setattr(knn_cpu, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert resolve_precision("auto") == "bf16"
    reference, _, queries, _ = _clusters(11, 1500, 60, 24, 1.5)
    stats = KnnCpuStats()
    _, idx = knn_topk_cpu(torch.from_numpy(reference), torch.from_numpy(queries), 10, stats=stats)
    assert stats.precision == "bf16"
    _, expected = _brute_force(reference, queries, 10)
    _assert_neighbours(idx, reference, queries, expected, tol=1e-6)


def test_int8_gemm_self_check_passes_where_int8_is_offered() -> None:
    if knn_cpu._int8_available():  # exact int32 sums, checked once per process
        assert knn_cpu._int_mm_exact()
