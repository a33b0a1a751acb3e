"""The k-NN vote over top-k neighbours, shared by every k-NN backend (runs where the tensors are)."""

from __future__ import annotations

import torch

from fastmem.errors import fail

VOTES: tuple[str, ...] = ("majority", "weighted")


def knn_vote(
    similarities: torch.Tensor,
    indices: torch.Tensor,
    reference_labels: torch.Tensor,
    num_classes: int,
    vote: str = "majority",
    temperature: float = 0.07,
) -> torch.Tensor:
    """Class per query from its neighbours: unweighted majority (paper) or exp(sim/T) weights (DINO).

    A tie between classes goes to the smaller class index (argmax returns the first maximum).
    """
    if vote not in VOTES:
        fail(f"unknown vote {vote!r}; use majority or weighted")
    labels = reference_labels.to(indices.device, torch.int64)[indices]
    weights = torch.ones_like(similarities) if vote == "majority" else torch.exp(similarities.float() / temperature)
    scores = torch.zeros(indices.shape[0], num_classes, device=indices.device, dtype=weights.dtype)
    scores.scatter_add_(1, labels, weights)
    return scores.argmax(dim=1)
