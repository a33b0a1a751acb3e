"""Intervals of a run's probes: each accuracy's 95 % Wilson interval over the queries, and the paired
bootstrap interval of a difference between two probes over the same queries (fastmem.run.stats).

Accuracy intervals need only the count and the number of queries (metrics.jsonl's `probe_queries`);
differences need the per-query predictions the trainer keeps in RUN_DIR/probe_predictions/.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from fastmem.run.metrics import RunRecords, knn_of
from fastmem.run.predictions import predictions_path, read_predictions
from fastmem.run.stats import Interval, paired_difference, wilson_interval


def probe_record(records: RunRecords, epoch: int) -> dict[str, float]:
    """The k-NN accuracies of the probe at `epoch` (empty if there was none)."""
    for record in records.probes:
        if int(record["epoch"]) == epoch:
            return knn_of(record) | {"probe_queries": record.get("probe_queries")}
    return {}


def file_intervals(path: Path) -> OrderedDict[str, Interval]:
    """Per probe point: the accuracy of a predictions file with its Wilson interval (empty if there is no file)."""
    found = correctness_of(path)
    if found is None:
        return OrderedDict()
    return OrderedDict((layer, wilson_interval(int(hits.sum()), int(hits.size))) for layer, hits in found[0].items())


def accuracy_intervals(records: RunRecords, epoch: int) -> OrderedDict[str, Interval]:
    """Per probe point: the accuracy at `epoch` with its Wilson interval (empty without a query count)."""
    record = probe_record(records, epoch)
    n = record.pop("probe_queries", None)
    if not n:
        return OrderedDict()
    return OrderedDict((layer, wilson_interval(int(round(value * n)), int(n))) for layer, value in record.items())


def correctness(run_dir: str | Path, epoch: int) -> tuple[OrderedDict[str, np.ndarray], np.ndarray] | None:
    """Per probe point, which queries the probe at `epoch` got right, and the queries' true labels
    (None if its predictions were not kept)."""
    return correctness_of(predictions_path(run_dir, epoch))


def correctness_of(path: Path) -> tuple[OrderedDict[str, np.ndarray], np.ndarray] | None:
    """`correctness` of a named predictions file (e.g. a baseline probe's); None if it does not exist."""
    if not path.exists():
        return None
    predictions, truth = read_predictions(path)
    return OrderedDict((layer, predicted == truth) for layer, predicted in predictions.items()), truth


def paired_deltas(run_a: str | Path, epoch_a: int, run_b: str | Path, epoch_b: int,
                  seed: int = 0) -> OrderedDict[str, Interval]:
    """Per probe point: accuracy(A at epoch_a) − accuracy(B at epoch_b) on the same queries, with the paired
    bootstrap interval; empty when either probe's predictions are missing or were made on other queries."""
    return paired_deltas_of(predictions_path(run_a, epoch_a), predictions_path(run_b, epoch_b), seed)


def paired_deltas_of(path_a: Path, path_b: Path, seed: int = 0) -> OrderedDict[str, Interval]:
    """`paired_deltas` of two named predictions files."""
    a, b = correctness_of(path_a), correctness_of(path_b)
    if a is None or b is None or not np.array_equal(a[1], b[1]):
        return OrderedDict()
    return OrderedDict((layer, paired_difference(a[0][layer], b[0][layer], seed=seed)) for layer in a[0] if layer in b[0])
