"""Blocked cosine k-NN in torch (CPU or GPU) with bounded memory: similarity tiles + running top-k.

Ties: candidates are ranked by similarity, then by smaller reference index (a stable merge), and a
vote tie goes to the smaller class index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmem.errors import fail


def knn_topk(
    reference: torch.Tensor, queries: torch.Tensor, k: int, *, block_size: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities and reference indices for each query, (Nq, k) each, best first."""
    if reference.ndim != 2 or queries.ndim != 2 or reference.shape[1] != queries.shape[1]:
        fail(f"k-NN needs 2-D inputs of equal width, got {tuple(reference.shape)} and {tuple(queries.shape)}")
    if not 1 <= k <= reference.shape[0]:
        fail(f"k must be in [1, {reference.shape[0]}], got {k}")
    ref = F.normalize(reference.float(), dim=1)
    qry = F.normalize(queries.float(), dim=1)
    best_sim = torch.full((qry.shape[0], 0), float("-inf"), device=qry.device)
    best_idx = torch.zeros((qry.shape[0], 0), dtype=torch.int64, device=qry.device)
    for start in range(0, ref.shape[0], block_size):
        sims = qry @ ref[start : start + block_size].T
        block_k = min(k, sims.shape[1])
        sim, idx = torch.topk(sims, block_k, dim=1, sorted=True)
        # Merge: earlier blocks first, so a stable sort keeps smaller indices ahead on ties.
        cand_sim = torch.cat([best_sim, sim], dim=1)
        cand_idx = torch.cat([best_idx, idx + start], dim=1)
        order = torch.sort(cand_sim, dim=1, descending=True, stable=True).indices[:, :k]
        best_sim, best_idx = cand_sim.gather(1, order), cand_idx.gather(1, order)
    return best_sim, best_idx


def knn_classify(
    reference: torch.Tensor,
    reference_labels: torch.Tensor,
    queries: torch.Tensor,
    k: int = 20,
    vote: str = "majority",
    temperature: float = 0.07,
    num_classes: int | None = None,
    *,
    query_block: int = 4096,
) -> torch.Tensor:
    """Predicted class per query: unweighted majority (paper) or exp(sim/T)-weighted vote (DINO)."""
    if vote not in ("majority", "weighted"):
        fail(f"unknown vote {vote!r}; use majority or weighted")
    labels = reference_labels.to(reference.device, torch.int64)
    classes = int(num_classes or int(labels.max()) + 1)
    predictions = []
    for start in range(0, queries.shape[0], query_block):
        sim, idx = knn_topk(reference, queries[start : start + query_block], k)
        weights = torch.ones_like(sim) if vote == "majority" else torch.exp(sim / temperature)
        scores = torch.zeros(sim.shape[0], classes, device=sim.device)
        scores.scatter_add_(1, labels[idx], weights)
        predictions.append(scores.argmax(dim=1))  # argmax returns the first maximum: smaller class wins
    return torch.cat(predictions)
