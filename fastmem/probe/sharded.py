"""The k-NN probe split across torchrun ranks, with the single-process result exactly.

Owns the split and the gathers: each rank embeds a contiguous block of whole extraction batches (the
same batches one process would run, so every embedding is bit for bit the single-process one), the
blocks are all-gathered in rank order so every rank holds the full reference and query sets, and each
rank classifies a contiguous block of queries whose predictions are all-gathered likewise. A
query's neighbours depend only on it and the references (ranking by exact fp32 similarity, ties to
the smaller index), so the gathered predictions, and the accuracy computed from them, equal one
process's. Every rank must call these functions (they are collectives).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fastmem.distributed import collective_device, rank_info
from fastmem.kernels import knn_classify
from fastmem.models import EncoderProjector

from .extract import Embedding, extract_embeddings


def rank_block(count: int, rank: int, world: int, align: int = 1) -> tuple[int, int]:
    """[start, stop) of rank `rank`'s contiguous share of `count` items, cut at multiples of `align`."""
    units = -(-count // align)
    start = (rank * units // world) * align
    stop = ((rank + 1) * units // world) * align
    return min(start, count), min(stop, count)


def gather_rows(local: torch.Tensor, rows_per_rank: list[int]) -> torch.Tensor:
    """Every rank's rows concatenated in rank order, on the CPU (shapes beyond dim 0 must agree)."""
    device = collective_device()
    padded = torch.zeros((max(rows_per_rank), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in rows_per_rank]
    dist.all_gather(parts, padded)
    return torch.cat([part[:rows] for part, rows in zip(parts, rows_per_rank)]).cpu()


def gather_objects(value: Any) -> list[Any]:
    """`value` from every rank, in rank order (small metadata only)."""
    everyone: list[Any] = [None] * rank_info().world
    dist.all_gather_object(everyone, value)
    return everyone


def layers_missing_anywhere(missing: tuple[str, ...], layers: tuple[str, ...]) -> tuple[str, ...]:
    """The layers some rank did not find in its cache (a rank may not see rank 0's disk), in probe order."""
    union = set().union(*gather_objects(missing))
    return tuple(layer for layer in layers if layer in union)


def extract_embeddings_sharded(
    model: EncoderProjector, images: np.ndarray, *, layers: tuple[str, ...], batch_size: int = 1024,
    **extract_options: Any,
) -> OrderedDict[str, Embedding]:
    """`extract_embeddings` with the batches split across ranks; every rank returns the full result."""
    info = rank_info()
    start, stop = rank_block(len(images), info.rank, info.world, align=batch_size)
    local: OrderedDict[str, Embedding] = OrderedDict()
    if stop > start:
        local = extract_embeddings(model, images[start:stop], layers=layers, batch_size=batch_size, **extract_options)
    shapes = gather_objects((stop - start, {name: tuple(e.vectors.shape[1:]) for name, e in local.items()}))
    rows = [count for count, _ in shapes]
    gathered: OrderedDict[str, Embedding] = OrderedDict()
    for name in layers:
        (width,) = next(dims[name] for count, dims in shapes if count)
        vectors = local[name].vectors if name in local else np.empty((0, width), dtype=np.float16)
        norms = local[name].norms if name in local else np.empty(0, dtype=np.float32)
        # float16 travels as its bytes: exact, and every backend (gloo, NCCL) moves uint8.
        all_vectors = gather_rows(torch.from_numpy(np.ascontiguousarray(vectors).view(np.uint8)), rows)
        all_norms = gather_rows(torch.from_numpy(np.ascontiguousarray(norms)), rows)
        gathered[name] = Embedding(all_vectors.view(torch.float16).numpy(), all_norms.numpy())
    return gathered


def knn_classify_sharded(
    reference: torch.Tensor | np.ndarray, reference_labels: torch.Tensor | np.ndarray,
    queries: torch.Tensor | np.ndarray, **knn_options: Any,
) -> torch.Tensor:
    """`knn_classify` with the queries split across ranks; every rank returns all predictions (CPU)."""
    info = rank_info()
    start, stop = rank_block(len(queries), info.rank, info.world)
    local = torch.empty(0, dtype=torch.int64)
    if stop > start:
        local = knn_classify(reference, reference_labels, queries[start:stop], **knn_options).cpu().to(torch.int64)
    rows = [b - a for a, b in (rank_block(len(queries), r, info.world) for r in range(info.world))]
    return gather_rows(local, rows)
