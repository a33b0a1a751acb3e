"""Blocked cosine k-NN in torch (CPU or GPU) with bounded memory: similarity tiles + running top-k.

The plain fp32 baseline (what DINO and solo-learn do) and the oracle of the faster backends.
Ranking: similarity descending, ties broken by the smaller reference index (a stable merge).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_topk(
    reference: torch.Tensor, queries: torch.Tensor, k: int, *, block_size: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities and reference indices for each query, (Nq, k) each, best first."""
    ref = F.normalize(reference.float(), dim=1)
    qry = F.normalize(queries.float(), dim=1)
    best_sim = torch.full((qry.shape[0], 0), float("-inf"), device=qry.device)
    best_idx = torch.zeros((qry.shape[0], 0), dtype=torch.int64, device=qry.device)
    for start in range(0, ref.shape[0], block_size):
        sims = qry @ ref[start : start + block_size].T
        block_k = min(k, sims.shape[1])
        # topk does not order equal values by index: sort the block stably instead when it is small
        # enough, so ties resolve to the smaller index.
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :block_k]
        sim, idx = sims.gather(1, order), order
        cand_sim = torch.cat([best_sim, sim], dim=1)
        cand_idx = torch.cat([best_idx, idx + start], dim=1)
        # Earlier blocks come first, so a stable sort keeps smaller indices ahead on ties.
        merged = torch.sort(cand_sim, dim=1, descending=True, stable=True).indices[:, :k]
        best_sim, best_idx = cand_sim.gather(1, merged), cand_idx.gather(1, merged)
    return best_sim, best_idx
