"""Probe metrics as plugins (fastmem/probe/metrics/): k-NN at several k from one search, the registry,
the linear metric against scikit-learn on a real layer, memorization, and `RUN_DIR --metrics`."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import QUICK_RUN, run_module
from fastmem.kernels import knn_classify, knn_topk, knn_vote
from fastmem.kernels.vote import knn_vote_several_k
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from fastmem.data import load_arrays
from fastmem.data.synthetic import make_synthetic
from fastmem.errors import FastmemError
from fastmem.models import create_model
from fastmem.probe import METRICS, extract_embeddings, probe_model, register_metric
from fastmem.probe.__main__ import main as probe_main
from fastmem.probe.linear import normalize_rows
from fastmem.probe.metrics import (
    LayerInputs,
    MetricOptions,
    MetricValue,
    drop_self,
    knn_classify_several_k,
    leave_one_out_knn,
    resolve_metrics,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KS = (1, 2, 4, 10, 25, 700)  # even k for vote ties; 700 > the 600 references: every reference votes


def _gaussian_with_duplicates(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """600 references (duplicated rows: exact similarity ties), 120 queries (copies of references, a zero row)."""
    rng = np.random.default_rng(seed)
    reference = rng.standard_normal((600, 24)).astype(np.float32)
    reference[300:360] = reference[10:70]
    reference[400:430] = reference[5]  # 31 copies of one row
    queries = rng.standard_normal((120, 24)).astype(np.float32)
    queries[:30] = reference[rng.integers(0, 600, 30)]
    queries[30:36] = reference[5]
    queries[36] = 0
    return reference, rng.integers(0, 4, 600), queries


def _basis(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scaled basis vectors: every cosine similarity is exactly 0 or 1, so neighbours tie in masses and the
    smaller index decides."""
    rng = np.random.default_rng(seed)
    reference = np.zeros((600, 6), np.float32)
    reference[np.arange(600), rng.integers(0, 6, 600)] = rng.integers(1, 5, 600)
    queries = np.zeros((90, 6), np.float32)
    queries[np.arange(90), rng.integers(0, 6, 90)] = 2
    return reference, rng.integers(0, 4, 600), queries


def _cuda_available() -> bool:
    from fastmem.kernels.knn_cuda_launch import cuda_available

    return cuda_available()


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _cuda_available(), reason="needs CuPy and a GPU")])


@pytest.mark.parametrize("backend", ["cpu", "torch", CUDA])
@pytest.mark.parametrize("vote", ["majority", "weighted"])
@pytest.mark.parametrize("make", [_gaussian_with_duplicates, _basis], ids=["gaussian-duplicates", "exact-ties"])
def test_several_k_from_one_search_equal_separate_searches(make, vote: str, backend: str) -> None:
    reference, labels, queries = make(0)
    device = "cuda" if backend == "cuda" else "cpu"
    several = knn_classify_several_k(reference, labels, queries, KS, vote=vote, num_classes=4, backend=backend,
                                     device=device)
    assert list(several) == list(KS)
    for k in KS:
        alone = knn_classify(reference, labels, queries, k=k, vote=vote, num_classes=4, backend=backend, device=device)
        assert torch.equal(several[k], alone), (k, int((several[k] != alone).sum()))
    if vote == "majority":  # the data does exercise the vote's tie rule (a tie goes to the smaller class)
        _, indices = knn_topk(reference, queries, 2, backend=backend, device=device)
        counts = F.one_hot(torch.as_tensor(labels)[indices.cpu()], 4).sum(1)
        top2 = counts.topk(2, dim=1).values
        assert (top2[:, 0] == top2[:, 1]).any()


def test_vote_of_a_prefix_is_the_vote_at_that_k() -> None:
    reference, labels, queries = _gaussian_with_duplicates(1)
    similarities, indices = knn_topk(reference, queries, 30, backend="torch")
    votes = knn_vote_several_k(similarities, indices, torch.as_tensor(labels), 4, (3, 30, 50))
    for k in (3, 30):
        assert torch.equal(votes[k], knn_vote(similarities[:, :k], indices[:, :k], torch.as_tensor(labels), 4))
    assert torch.equal(votes[50], votes[30])  # beyond the list: all of it votes
    with pytest.raises(FastmemError, match="k must be"):
        knn_vote_several_k(similarities, indices, torch.as_tensor(labels), 4, (0,))


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


class NearestCentroid:
    """A metric written in a test: the class of the nearest class mean of the reference (cosine)."""

    name = "centroid"
    needs = frozenset({"reference", "queries"})

    def columns(self, options: MetricOptions) -> tuple[str, ...]:
        return ("centroid",)

    def evaluate(self, inputs: LayerInputs, options: MetricOptions) -> OrderedDict[str, MetricValue]:
        reference, queries = normalize_rows(inputs.reference), normalize_rows(inputs.queries)
        labels = torch.as_tensor(inputs.reference_labels)
        centres = torch.stack([reference[labels == c].mean(0) for c in range(inputs.num_classes)])
        predicted = (queries @ F.normalize(centres, dim=1).T).argmax(1)
        return OrderedDict(centroid=MetricValue.from_predictions(predicted, inputs.query_labels))


def test_a_metric_registered_in_a_test_is_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fastmem.probe.metrics.METRICS", dict(METRICS))  # registered here, gone afterwards
    from fastmem.probe import metrics

    register_metric(NearestCentroid())
    assert "centroid" in metrics.METRICS and [m.name for m in resolve_metrics("knn,centroid")] == ["knn", "centroid"]
    train, test = make_synthetic(200, size=12, seed=0), make_synthetic(60, size=12, seed=0, split="test")
    report = probe_model(_tiny_model(), ["1", "3"], train.images, train.labels, test.images, test.labels,
                         metrics=("knn", "centroid"), k=(5, 10), device="cpu")
    assert report.columns == ("knn@5", "knn@10", "centroid") and report.layers == ("1", "3")
    for layer in report.layers:
        value = report.value(layer, "centroid")
        assert value.n == 60 and value.predictions.shape == (60,) and value.interval.low <= value.value
    assert "centroid" in report.table().splitlines()[0]


def test_unknown_metric_and_bad_needs_are_one_line() -> None:
    with pytest.raises(FastmemError, match="unknown metric.*nope.*registered: knn, linear, memorization") as err:
        resolve_metrics("knn,nope")
    assert "\n" not in str(err.value)

    class Greedy(NearestCentroid):
        name, needs = "greedy", frozenset({"the test set's labels at training time"})

    with pytest.raises(FastmemError, match="a metric may need"):
        register_metric(Greedy())


@pytest.fixture(scope="module")
def fmnist_layer() -> tuple[np.ndarray, np.ndarray]:
    """The float16 cached-style embedding of 2,000 Fashion-MNIST training images (1,500 fit + 500 queries) at a
    conv4's head_hidden after 30 SGD steps on the fit part (tests/probe/test_linear_probe.py's approach)."""
    try:
        data = load_arrays("fashion-mnist", "train")
    except FastmemError as err:
        pytest.skip(f"Fashion-MNIST is not installed here: {err}")
    rows = np.random.default_rng(1).choice(len(data), 2000, replace=False)
    images, labels = data.images[rows], data.labels[rows].astype(np.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = create_model("conv4", num_classes=10, in_channels=1, image_size=28, width=0.25, bottleneck_dim=128)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        x, y = torch.from_numpy(images[:1500]).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(labels[:1500])
        batches = torch.Generator().manual_seed(0)
        for _ in range(30):
            batch = torch.randint(0, 1500, (128,), generator=batches)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        embedding = extract_embeddings(model, images, device=torch.device("cpu"), layers=("head_hidden",))
    finally:
        torch.set_num_threads(threads)
    return embedding["head_hidden"].vectors, labels


def test_linear_metric_within_half_a_point_of_sklearn(fmnist_layer) -> None:
    vectors, labels = fmnist_layer
    assert vectors.dtype == np.float16  # the cache's rows, as the metric gets them
    inputs = LayerInputs("head_hidden", 10, reference=vectors[:1500], reference_labels=labels[:1500],
                         queries=vectors[1500:], query_labels=labels[1500:])
    value = METRICS["linear"].evaluate(inputs, MetricOptions())["linear"]
    assert value.n == 500 and value.info["converged"] and value.predictions.dtype == np.int64
    rows = vectors.astype(np.float32)
    with threadpool_limits(1):
        oracle = LogisticRegression(C=value.info["sklearn_C"], tol=1e-8, max_iter=20000).fit(
            normalize_rows(rows[:1500]).numpy(), labels[:1500])
    theirs = (oracle.predict(normalize_rows(rows[1500:]).numpy()) == labels[1500:]).mean()
    assert value.value > 0.5, value.value  # a real feature
    assert abs(value.value - theirs) <= 0.005, (value.value, theirs)


def test_memorization_of_the_label_itself_is_total_and_of_a_random_layer_chance() -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 10, 2000)
    metric, options = METRICS["memorization"], MetricOptions(k=(10, 20))
    assert metric.columns(options) == ("memo-knn@10", "memo-knn@20", "memo-linear")
    one_hot = metric.evaluate(LayerInputs("label", 10, train=np.eye(10, dtype=np.float16)[targets],
                                          train_targets=targets), options)
    for value in one_hot.values():
        assert value.value >= 0.999 and value.n == 2000 and value.interval.high == pytest.approx(1.0)
    random_layer = metric.evaluate(LayerInputs("noise", 10, train=rng.standard_normal((2000, 8)).astype(np.float16),
                                               train_targets=targets), options)
    share = np.bincount(targets).max() / 2000
    for column, value in random_layer.items():
        assert value.chance == pytest.approx(share) and value.info["uniform"] == 0.1
        assert abs(value.value - 0.1) < 0.03 if column.startswith("memo-knn") else value.value < share + 0.04, \
            (column, value.value, share)


def test_probe_model_scores_memorization_against_the_given_training_labels() -> None:
    train, test = make_synthetic(200, size=12, seed=1), make_synthetic(40, size=12, seed=1, split="test")
    targets = np.random.default_rng(1).integers(0, 10, 200)
    report = probe_model(_tiny_model(), ["3"], train.images, train.labels, test.images, test.labels,
                         metrics=("knn", "memorization"), k=5, train_targets=targets, device="cpu")
    assert report.columns == ("knn@5", "memo-knn@5", "memo-linear") and report.train == 200
    memo = report.value("3", "memo-knn@5")
    assert memo.n == 200 and np.array_equal(memo.truth, targets) and memo.chance == np.bincount(targets).max() / 200
    assert "chance" in report.table().splitlines()[-1]
    with pytest.raises(FastmemError, match="memorization needs the labels the network trained on"):
        probe_model(_tiny_model(), ["3"], train.images, train.labels, metrics="memorization")


def test_leave_one_out_drops_the_image_itself_even_behind_its_duplicates() -> None:
    # Rows 0, 1 and 2 are one image: row 2's list ranks its copies 0 and 1 ahead of itself (equal similarity,
    # smaller index); a row whose list misses itself loses its last entry.
    similarities = torch.tensor([[1.0, 1.0, 1.0, 0.5], [1.0, 1.0, 1.0, 0.5], [1.0, 1.0, 1.0, 0.5], [0.9, 0.8, 0.7, 0.6]])
    indices = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 5]])
    kept_similarities, kept = drop_self(similarities, indices)
    assert kept.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    assert kept_similarities[3].tolist() == pytest.approx([0.9, 0.8, 0.7])
    # Against a brute-force oracle on exact ties (basis vectors; duplicates everywhere).
    train, _, _ = _basis(3)
    targets = np.random.default_rng(3).integers(0, 3, len(train))
    predicted = leave_one_out_knn(train, targets, (1, 4, 9), 3, backend="cpu")
    unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(train)), similarity.shape), -similarity), axis=1)
    for k in (1, 4, 9):
        votes = np.stack([np.bincount(targets[row[:k]], minlength=3) for row in order])
        assert np.array_equal(predicted[k].numpy(), votes.argmax(1)), k


def test_run_cli_metrics_table_files_and_memorization(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_module("fastmem.train", *QUICK_RUN, "--epochs", "1", "--probe-every", "-1", "--out", str(out)).returncode == 0
    result = run_module("fastmem.probe", str(out), "--device", "cpu", "--threads", "1", "--layers", "stage2,z",
                        "--metrics", "knn,linear,memorization", "--k", "5,10")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("layer"))
    assert header.split() == ["layer", "knn@5", "knn@10", "linear", "memo-knn@5", "memo-knn@10", "memo-linear"]
    for layer in ("stage2", "z"):
        row = next(line for line in lines if line.startswith(layer + " "))
        assert row.count("%") == 6 and row.count("[") == 6
    assert any("chance" in line for line in lines)
    stem = out / "probe-epoch1-knn+linear+memorization-k5-10-majority"
    record = json.loads(stem.with_suffix(".json").read_text())
    assert record["epoch"] == 1 and record["queries"] == 200 and record["train"] == 256
    assert set(record["layers"]["z"]) == {"knn@5", "knn@10", "linear", "memo-knn@5", "memo-knn@10", "memo-linear"}
    predictions = np.load(stem.with_suffix(".npz"))
    assert predictions["z/knn@10"].shape == (200,) and predictions["z/memo-linear"].shape == (256,)
    # The run's default k-NN probe is the same numbers, in its own table and files.
    default = run_module("fastmem.probe", str(out), "--device", "cpu", "--layers", "stage2,z", "--k", "10")
    assert default.returncode == 0 and "k-NN accuracy" in default.stdout
    plain = json.loads((out / "probe-epoch1-k10-majority.json").read_text())
    assert plain["k"] == 10 and plain["accuracy"]["z"] == pytest.approx(record["layers"]["z"]["knn@10"]["value"])
    (out / "labels.npz").unlink()
    with pytest.raises(FastmemError) as err:  # in process: the CLI prints it as one `fastmem: error:` line
        probe_main([str(out), "--device", "cpu", "--metrics", "memorization"])
    assert str(err.value) == f"memorization needs the run's training labels and {out / 'labels.npz'} is missing"
