"""Probe metrics as plugins over cached embeddings: the registry `METRICS` (name → ProbeMetric).

A metric is one module here (a class with `name`, `needs`, `columns`, `evaluate`: base.py), its test,
and one line in METRICS below. `evaluate_layer` runs the requested ones on one layer's inputs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from fastmem.errors import fail

from .base import NEEDS, LayerInputs, MetricOptions, MetricValue, ProbeMetric, label_chance
from .knn import KnnMetric, knn_classify_several_k
from .linear import LinearMetric
from .memorization import MemorizationMetric, drop_self, leave_one_out_knn

METRICS: dict[str, ProbeMetric] = {
    "knn": KnnMetric(),
    "linear": LinearMetric(),
    "memorization": MemorizationMetric(),
}


def register_metric(metric: ProbeMetric) -> ProbeMetric:
    """Add (or replace) a metric under its name; returns it (usable as a decorator on an instance)."""
    if not set(metric.needs) <= set(NEEDS):
        fail(f"metric {metric.name!r} needs {sorted(set(metric.needs) - set(NEEDS))}; a metric may need {', '.join(NEEDS)}")
    METRICS[metric.name] = metric
    return metric


def resolve_metrics(names: str | Iterable[str]) -> tuple[ProbeMetric, ...]:
    """The registered metrics named (a comma list or names), in order, each once; unknown names fail in one line."""
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not wanted:
        fail(f"no metric named; choose from {', '.join(METRICS)}")
    unknown = [n for n in wanted if n not in METRICS]
    if unknown:
        fail(f"unknown metric(s) {', '.join(unknown)}; registered: {', '.join(METRICS)}")
    return tuple(METRICS[n] for n in dict.fromkeys(wanted))


def needed(metrics: Iterable[ProbeMetric]) -> frozenset[str]:
    """The union of what the metrics read."""
    return frozenset().union(*(m.needs for m in metrics))


def evaluate_layer(metrics: Iterable[ProbeMetric], inputs: LayerInputs,
                   options: MetricOptions) -> OrderedDict[str, MetricValue]:
    """Every metric's columns for one layer, in metric then column order."""
    columns: OrderedDict[str, MetricValue] = OrderedDict()
    for metric in metrics:
        columns.update(metric.evaluate(inputs, options))
    return columns


__all__ = ["METRICS", "NEEDS", "KnnMetric", "LayerInputs", "LinearMetric", "MemorizationMetric", "MetricOptions",
           "MetricValue", "ProbeMetric", "drop_self", "evaluate_layer", "knn_classify_several_k", "label_chance",
           "leave_one_out_knn", "needed", "register_metric", "resolve_metrics"]
