"""What a probe metric is: the inputs it declares, the options it reads, and the value it returns per layer.

A metric sees one layer at a time, as cached embeddings (unit-norm float16 rows, `Embedding.vectors`):
- `reference` / `reference_labels`: the k-NN reference or linear-probe training rows, with the TRUE labels;
- `queries` / `query_labels`: the held-out rows (the test images), with the true labels;
- `train` / `train_targets`: the run's training images with the labels it actually trained on (random labels,
  for a memorization run) — the same rows as `reference` unless the run probes against another reference.
A metric lists what it reads in `needs` (names from NEEDS); the driver embeds only what some metric needs
and fails with one line when a metric needs what the caller cannot give (e.g. no random labels).

It returns, per layer, one or more named columns (`knn@20`, `linear`, …), each a `MetricValue`: the
fraction correct over its rows, its 95 % Wilson interval, and, where it applies, the per-row predictions
(for paired intervals between layers, checkpoints or runs) and the level a guess would reach (`chance`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from fastmem.kernels import DEFAULT_K, DEFAULT_TEMPERATURE, HOST_CHUNK_BYTES
from fastmem.run.stats import Interval, wilson_interval

from ..linear import DEFAULT_GRID

NEEDS: tuple[str, ...] = ("reference", "queries", "train_targets")


@dataclass(frozen=True)
class LayerInputs:
    """One layer's embeddings and labels; a part no requested metric needs is None."""

    layer: str
    num_classes: int
    reference: np.ndarray | None = None  # (Nr, D) unit rows (float16 from the cache, or any float)
    reference_labels: np.ndarray | None = None  # (Nr,) true labels
    queries: np.ndarray | None = None  # (Nq, D)
    query_labels: np.ndarray | None = None  # (Nq,) true labels
    train: np.ndarray | None = None  # (Nt, D) the training images' rows
    train_targets: np.ndarray | None = None  # (Nt,) the labels the network trained on (random ones)


@dataclass(frozen=True)
class MetricOptions:
    """The knobs metrics read (each reads its own); defaults are the probe's."""

    k: tuple[int, ...] = (DEFAULT_K,)
    vote: str = "majority"
    temperature: float = DEFAULT_TEMPERATURE
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    knn_backend: str = "auto"
    chunk_bytes: int = HOST_CHUNK_BYTES
    distributed: bool = False  # under torchrun: k-NN queries split across ranks (every rank calls)
    linear_seed: int = 0  # the linear probe's held-out split
    linear_grid: tuple[float, ...] = DEFAULT_GRID
    memorization_l2: float = 1e-5  # λ of the linear fit to the random labels (no held-out choice: module doc)
    threads: int = 1  # torch threads of the linear solver


@dataclass(frozen=True)
class MetricValue:
    """A fraction correct over `n` rows, with the per-row predictions and labels where the metric has them."""

    hits: int
    n: int
    predictions: np.ndarray | None = None  # (n,) int64, per query (or per training image)
    truth: np.ndarray | None = None  # (n,) the labels the predictions are scored against
    chance: float | None = None  # what guessing reaches on these labels (memorization: the largest label share)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float:
        return self.hits / self.n

    @property
    def interval(self) -> Interval:
        """The 95 % Wilson interval of the fraction over the rows."""
        return wilson_interval(self.hits, self.n)

    def correct(self) -> np.ndarray:
        """Per-row correctness (bool); needs the predictions."""
        if self.predictions is None or self.truth is None:
            raise ValueError("this metric value carries no per-row predictions")
        return self.predictions == self.truth

    @classmethod
    def from_predictions(cls, predictions: np.ndarray | torch.Tensor, truth: np.ndarray, *,
                         chance: float | None = None, info: dict[str, Any] | None = None) -> MetricValue:
        predicted = np.asarray(predictions.cpu() if isinstance(predictions, torch.Tensor) else predictions)
        predicted = predicted.astype(np.int64)
        labels = np.asarray(truth).astype(np.int64)
        return cls(int((predicted == labels).sum()), int(labels.shape[0]), predicted, labels, chance, info or {})

    def to_dict(self, with_predictions: bool = False) -> dict[str, Any]:
        interval = self.interval
        record: dict[str, Any] = {"value": self.value, "low_95": interval.low, "high_95": interval.high,
                                  "hits": self.hits, "n": self.n}
        if self.chance is not None:
            record["chance"] = self.chance
        if self.info:
            record["info"] = self.info
        if with_predictions and self.predictions is not None:
            record["predictions"] = self.predictions.tolist()
        return record


@runtime_checkable
class ProbeMetric(Protocol):
    """A metric plugin: a name, what it reads (a subset of NEEDS), and per layer its named columns."""

    name: str
    needs: frozenset[str]

    def columns(self, options: MetricOptions) -> tuple[str, ...]:
        """The columns `evaluate` returns under these options, in order (known before any embedding)."""
        ...

    def evaluate(self, inputs: LayerInputs, options: MetricOptions) -> OrderedDict[str, MetricValue]:
        """Column name → value for one layer."""
        ...


def as_float32(rows: np.ndarray) -> np.ndarray:
    """Cached float16 rows (a memmap included) as an in-memory float32 array."""
    return np.asarray(rows, dtype=np.float32)


def label_chance(labels: np.ndarray, num_classes: int) -> tuple[float, float]:
    """(the largest label share — what always guessing the commonest label reaches —, 1 / num_classes)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return float(counts.max() / max(counts.sum(), 1)), 1.0 / num_classes
