"""The `knn` metric: cosine k-NN accuracy against the true labels at several k, from one neighbour search.

One top-max(k) search per layer (fastmem.kernels.knn_topk: exact, ties to the smaller reference index),
then one vote per k over the first k neighbours of that list (kernels/vote.py `knn_vote_several_k`):
each k's predictions equal a separate `knn_classify` call at that k. Columns: `knn@<k>` per k.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from fastmem.distributed import rank_info
from fastmem.errors import fail
from fastmem.kernels import DEFAULT_TEMPERATURE, HOST_CHUNK_BYTES, knn_topk
from fastmem.kernels.vote import check_vote, knn_vote_several_k

from ..sharded import gather_rows, rank_block
from .base import LayerInputs, MetricOptions, MetricValue


def knn_classify_several_k(
    reference: torch.Tensor | np.ndarray,
    reference_labels: torch.Tensor | np.ndarray,
    queries: torch.Tensor | np.ndarray,
    ks: tuple[int, ...] | list[int],
    vote: str = "majority",
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    *,
    device: str | torch.device | None = None,
    backend: str = "auto",
    chunk_bytes: int = HOST_CHUNK_BYTES,
) -> dict[int, torch.Tensor]:
    """Predicted class per query for every k in `ks` (k → (Nq,) int64), from one top-max(ks) search."""
    check_vote(vote)  # before the search: a bad vote fails fast
    labels = torch.as_tensor(np.asarray(reference_labels) if not isinstance(reference_labels, torch.Tensor)
                             else reference_labels).to(torch.int64)
    similarities, indices = knn_topk(reference, queries, max(ks), device=device, backend=backend,
                                     chunk_bytes=chunk_bytes)
    classes = int(num_classes or int(labels.max()) + 1)
    return knn_vote_several_k(similarities, indices, labels, classes, tuple(ks), vote, temperature)


def knn_classify_several_k_sharded(
    reference: torch.Tensor | np.ndarray, reference_labels: torch.Tensor | np.ndarray,
    queries: torch.Tensor | np.ndarray, ks: tuple[int, ...], **options: object,
) -> dict[int, torch.Tensor]:
    """`knn_classify_several_k` with the queries split across torchrun ranks; every rank gets all predictions."""
    info = rank_info()
    start, stop = rank_block(len(queries), info.rank, info.world)
    rows = [b - a for a, b in (rank_block(len(queries), r, info.world) for r in range(info.world))]
    local = {k: torch.empty(0, dtype=torch.int64) for k in ks}
    if stop > start:
        local = knn_classify_several_k(reference, reference_labels, queries[start:stop], ks, **options)  # type: ignore[arg-type]
    return {k: gather_rows(local[k].cpu().to(torch.int64), rows) for k in ks}


def check_ks(ks: tuple[int, ...]) -> tuple[int, ...]:
    """Distinct positive k, in the order given."""
    if not ks or any(int(k) < 1 for k in ks):
        fail(f"k must be positive integers, got {', '.join(map(str, ks)) or 'none'}")
    return tuple(dict.fromkeys(int(k) for k in ks))


class KnnMetric:
    """k-NN accuracy of the queries against the reference (true labels), one column per k."""

    name = "knn"
    needs = frozenset({"reference", "queries"})

    def columns(self, options: MetricOptions) -> tuple[str, ...]:
        return tuple(f"knn@{k}" for k in check_ks(options.k))

    def evaluate(self, inputs: LayerInputs, options: MetricOptions) -> OrderedDict[str, MetricValue]:
        assert inputs.reference is not None and inputs.queries is not None
        assert inputs.reference_labels is not None and inputs.query_labels is not None
        ks = check_ks(options.k)
        classify = knn_classify_several_k_sharded if options.distributed else knn_classify_several_k
        predicted = classify(inputs.reference, torch.as_tensor(np.asarray(inputs.reference_labels)),
                             inputs.queries, ks,
                             vote=options.vote, temperature=options.temperature, num_classes=inputs.num_classes,
                             device=options.device, backend=options.knn_backend, chunk_bytes=options.chunk_bytes)
        info = {"vote": options.vote, **({"temperature": options.temperature} if options.vote == "weighted" else {})}
        return OrderedDict((f"knn@{k}", MetricValue.from_predictions(predicted[k], inputs.query_labels,
                                                                     info={"k": k, **info})) for k in ks)
