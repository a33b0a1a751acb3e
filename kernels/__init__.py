"""Exact cosine k-NN, installed as `fastmem.kernels`: one entry point, a backend per device.

- `cpu`: a blocked int8 (or bf16) candidate screen with a rigorous error bound and an exact fp32
  re-rank, plain fp32 where neither is fast (`knn_cpu`);
- `cuda`: CuPy kernels — GEMM tiles feeding a streaming per-query top-k (`knn_cuda`);
- `torch`: plain blocked fp32 mm + topk on any device (`knn_torch`), the fallback and the oracle.
Host memory is bounded: inputs larger than `chunk_bytes` (fp32) are read in row blocks, memmaps
included, and the per-block top-k merged (`host_chunks`); the CUDA search streams references itself.
Neighbours are ranked by similarity, ties broken by the smaller reference index, on every backend;
a vote tie goes to the smaller class.
"""

from __future__ import annotations

import numpy as np
import torch

from fastmem.errors import fail

from .host_chunks import HOST_CHUNK_BYTES, blocked_topk, fits_one_block, read_rows, rows_per_block
from .knn_torch import knn_topk as knn_topk_torch
from .vote import DEFAULT_K, DEFAULT_TEMPERATURE, VOTES, check_vote, knn_vote

BACKENDS: tuple[str, ...] = ("auto", "cpu", "cuda", "torch")


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    array = np.asarray(x)
    return torch.from_numpy(array if array.flags.writeable else np.array(array))  # memmaps are read-only


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend `auto` means on `device`; 'cuda' without CuPy or a GPU is a user error."""
    if backend not in BACKENDS:
        fail(f"unknown k-NN backend {backend!r}; use {', '.join(BACKENDS)}")
    if backend == "cuda" or (backend == "auto" and device.type == "cuda"):
        from .knn_cuda_launch import cuda_available

        if cuda_available():
            return "cuda"
        if backend == "cuda":
            fail("CUDA k-NN needs CuPy and a GPU: pip install -e .[cuda12] or .[cuda13]")
        return "torch"  # a CUDA device without CuPy: torch on the GPU
    if backend == "auto":
        return "cpu"
    return backend


def knn_topk(
    reference: torch.Tensor | np.ndarray,
    queries: torch.Tensor | np.ndarray,
    k: int,
    *,
    device: str | torch.device | None = None,
    backend: str = "auto",
    chunk_bytes: int = HOST_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities and reference indices per query, (Nq, min(k, Nr)) each, best first.

    Arrays (memmaps included) wider than `chunk_bytes` as fp32 are read block by block, never whole.
    """
    if device is not None:
        target = torch.device(device)
    else:
        target = queries.device if isinstance(queries, torch.Tensor) else torch.device("cpu")
    if reference.ndim != 2 or queries.ndim != 2 or reference.shape[1] != queries.shape[1]:
        fail(f"k-NN needs 2-D inputs of equal width, got {tuple(reference.shape)} and {tuple(queries.shape)}")
    if k < 1 or reference.shape[0] < 1:
        fail(f"k must be >= 1 and the reference set non-empty, got k={k} and {reference.shape[0]} references")
    k = min(k, reference.shape[0])  # k beyond the reference set: every reference votes
    chosen = resolve_backend(backend, target)
    if chosen == "cuda":
        from .knn_cuda import knn_topk_cuda

        rows = rows_per_block(queries.shape[1], chunk_bytes)  # host arrays of references stream in chunks
        parts = [knn_topk_cuda(reference, read_rows(queries, start, start + rows).to(target), k)
                 for start in range(0, max(queries.shape[0], 1), rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if chosen == "cpu":
        from .knn_cpu import knn_topk_cpu

        def search(ref: torch.Tensor, qry: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
            return knn_topk_cpu(ref.cpu(), qry.cpu(), count)
    else:
        def search(ref: torch.Tensor, qry: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
            return knn_topk_torch(ref.to(target), qry.to(target), count)
    if fits_one_block(reference, chunk_bytes) and fits_one_block(queries, chunk_bytes):
        return search(_as_tensor(reference), _as_tensor(queries), k)
    return blocked_topk(reference, queries, k, search, chunk_bytes=chunk_bytes)


def knn_classify(
    reference: torch.Tensor | np.ndarray,
    reference_labels: torch.Tensor | np.ndarray,
    queries: torch.Tensor | np.ndarray,
    k: int = DEFAULT_K,
    vote: str = "majority",
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    *,
    device: str | torch.device | None = None,
    backend: str = "auto",
    chunk_bytes: int = HOST_CHUNK_BYTES,
) -> torch.Tensor:
    """Predicted class per query by cosine k-NN: majority vote (paper) or exp(sim/T)-weighted (DINO)."""
    check_vote(vote)  # before the search: a bad vote fails fast
    labels = _as_tensor(reference_labels).to(torch.int64)
    similarities, indices = knn_topk(reference, queries, k, device=device, backend=backend, chunk_bytes=chunk_bytes)
    classes = int(num_classes or int(labels.max()) + 1)
    return knn_vote(similarities, indices, labels, classes, vote, temperature)


__all__ = ["BACKENDS", "DEFAULT_K", "HOST_CHUNK_BYTES", "DEFAULT_TEMPERATURE", "VOTES", "knn_classify", "knn_topk", "knn_vote", "resolve_backend"]
