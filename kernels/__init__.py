"""Exact cosine k-NN, installed as `fastmem.kernels`: one entry point, a backend per device.

- `cpu`: a blocked int8 (or bf16) candidate screen with a rigorous error bound and an exact fp32
  re-rank, plain fp32 where neither is fast (`knn_cpu`);
- `cuda`: CuPy kernels — GEMM tiles feeding a streaming per-query top-k (`knn_cuda`);
- `torch`: plain blocked fp32 mm + topk on any device (`knn_torch`), the fallback and the oracle.
Neighbours are ranked by similarity, ties broken by the smaller reference index, on every backend;
a vote tie goes to the smaller class.
"""

from __future__ import annotations

import numpy as np
import torch

from fastmem.errors import fail

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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities and reference indices per query, (Nq, min(k, Nr)) each, best first."""
    queries = _as_tensor(queries)
    target = torch.device(device) if device is not None else queries.device
    if reference.ndim != 2 or queries.ndim != 2 or reference.shape[1] != queries.shape[1]:
        fail(f"k-NN needs 2-D inputs of equal width, got {tuple(reference.shape)} and {tuple(queries.shape)}")
    if k < 1 or reference.shape[0] < 1:
        fail(f"k must be >= 1 and the reference set non-empty, got k={k} and {reference.shape[0]} references")
    k = min(k, reference.shape[0])  # k beyond the reference set: every reference votes
    chosen = resolve_backend(backend, target)
    if chosen == "cuda":
        from .knn_cuda import knn_topk_cuda

        return knn_topk_cuda(reference, queries.to(target), k)  # host arrays stream in chunks
    reference = _as_tensor(reference)
    if chosen == "cpu":
        from .knn_cpu import knn_topk_cpu

        return knn_topk_cpu(reference.cpu(), queries.cpu(), k)
    return knn_topk_torch(reference.to(target), queries.to(target), k)


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
) -> torch.Tensor:
    """Predicted class per query by cosine k-NN: majority vote (paper) or exp(sim/T)-weighted (DINO)."""
    check_vote(vote)  # before the search: a bad vote fails fast
    labels = _as_tensor(reference_labels).to(torch.int64)
    similarities, indices = knn_topk(reference, queries, k, device=device, backend=backend)
    classes = int(num_classes or int(labels.max()) + 1)
    return knn_vote(similarities, indices, labels, classes, vote, temperature)


__all__ = ["BACKENDS", "DEFAULT_K", "DEFAULT_TEMPERATURE", "VOTES", "knn_classify", "knn_topk", "knn_vote", "resolve_backend"]
