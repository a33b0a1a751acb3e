"""The k-NN vote over top-k neighbours, shared by every k-NN backend (runs where the tensors are).

Owns the registry of votes (`VOTE_WEIGHTS`, names in `VOTES`) and the probe's defaults `DEFAULT_K` and
`DEFAULT_TEMPERATURE`: the trainer's config, the probe and its CLI take their choices and defaults here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastmem.errors import fail

DEFAULT_K = 20  # neighbours per query (paper)
DEFAULT_TEMPERATURE = 0.07  # T of the weighted vote's exp(sim/T) (DINO)


def majority_weights(similarities: torch.Tensor, temperature: float) -> torch.Tensor:
    """Every neighbour counts once (paper)."""
    return torch.ones_like(similarities)


def temperature_weights(similarities: torch.Tensor, temperature: float) -> torch.Tensor:
    """A neighbour counts exp(sim/T) (DINO)."""
    return torch.exp(similarities.float() / temperature)


# vote name → the weight of each neighbour from its similarity and the temperature
VOTE_WEIGHTS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "majority": majority_weights,
    "weighted": temperature_weights,
}
VOTES: tuple[str, ...] = tuple(VOTE_WEIGHTS)


def check_vote(vote: str) -> None:
    """Fail with one line on a vote that is not registered."""
    if vote not in VOTE_WEIGHTS:
        fail(f"unknown vote {vote!r}; use {' or '.join(VOTES)}")


def knn_vote(
    similarities: torch.Tensor,
    indices: torch.Tensor,
    reference_labels: torch.Tensor,
    num_classes: int,
    vote: str = "majority",
    temperature: float = DEFAULT_TEMPERATURE,
) -> torch.Tensor:
    """Class per query from its neighbours: unweighted majority (paper) or exp(sim/T) weights (DINO).

    A tie between classes goes to the smaller class index (argmax returns the first maximum).
    """
    check_vote(vote)
    labels = reference_labels.to(indices.device, torch.int64)[indices]
    weights = VOTE_WEIGHTS[vote](similarities, temperature)
    scores = torch.zeros(indices.shape[0], num_classes, device=indices.device, dtype=weights.dtype)
    scores.scatter_add_(1, labels, weights)
    return scores.argmax(dim=1)


def knn_vote_several_k(
    similarities: torch.Tensor,
    indices: torch.Tensor,
    reference_labels: torch.Tensor,
    num_classes: int,
    ks: tuple[int, ...] | list[int],
    vote: str = "majority",
    temperature: float = DEFAULT_TEMPERATURE,
) -> dict[int, torch.Tensor]:
    """Class per query for every k in `ks` (k → (Nq,) int64), all from one ranked top-max(ks) neighbour list.

    Neighbours are ranked (similarity, then the smaller index) the same way at every k, so the top-k
    of a query are the first k of its top-max(ks). The class scores are accumulated once, prefix by
    prefix in increasing k, and read at each k: the same additions in the same order as `knn_vote` over
    that prefix (scatter_add runs along a row in index order), so each k's result equals a search and
    a vote at that k, for the cost of one vote. A k beyond the list (more than the references) votes
    with all of it.
    """
    check_vote(vote)
    if not ks or any(k < 1 for k in ks):
        fail(f"every k must be >= 1, got {list(ks)}")
    width = indices.shape[1]
    labels = reference_labels.to(indices.device, torch.int64)[indices]
    weights = VOTE_WEIGHTS[vote](similarities, temperature)
    scores = torch.zeros(indices.shape[0], num_classes, device=indices.device, dtype=weights.dtype)
    predicted: dict[int, torch.Tensor] = {}
    done = 0
    for k in sorted({min(k, width) for k in ks}):
        scores.scatter_add_(1, labels[:, done:k], weights[:, done:k])
        predicted[k], done = scores.argmax(dim=1), k
    return {k: predicted[min(k, width)] for k in ks}
