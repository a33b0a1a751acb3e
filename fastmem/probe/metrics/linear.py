"""The `linear` metric: a linear probe (multinomial logistic regression) on a layer's cached embeddings.

Fitted on the reference rows with their true labels, scored on the queries, by the fixed protocol of
fastmem/probe/linear.py (`linear_probe_predictions`: rows L2-normalised, λ chosen on a seeded stratified
held-out 20 % of the reference, refit, argmax). The cache's float16 unit rows enter as float32.
Column: `linear`, with the protocol's record (chosen λ, its scikit-learn C, held-out scores) as `info`.
"""

from __future__ import annotations

from collections import OrderedDict

from ..linear import linear_probe_predictions
from .base import LayerInputs, MetricOptions, MetricValue, as_float32


class LinearMetric:
    """Linear-probe accuracy of the queries, fitted on the reference (true labels)."""

    name = "linear"
    needs = frozenset({"reference", "queries"})

    def columns(self, options: MetricOptions) -> tuple[str, ...]:
        return ("linear",)

    def evaluate(self, inputs: LayerInputs, options: MetricOptions) -> OrderedDict[str, MetricValue]:
        assert inputs.reference is not None and inputs.queries is not None
        assert inputs.reference_labels is not None and inputs.query_labels is not None
        predictions, info = linear_probe_predictions(
            as_float32(inputs.reference), inputs.reference_labels.astype("int64"), as_float32(inputs.queries),
            inputs.num_classes, seed=options.linear_seed, l2_grid=options.linear_grid, threads=options.threads)
        return OrderedDict(linear=MetricValue.from_predictions(predictions, inputs.query_labels, info=info))
