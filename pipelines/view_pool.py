"""i.i.d. views: each load of training sample i shows one of its pool images instead of image i.

Owns the per-load choice among a `ViewPool`'s images (the pool itself, and which images are
reserved for which sample, belong to the data it is drawn from: fastmem/data/iid_views.py): a
uniform draw in [0, M) from the counter RNG keyed by (seed, sample, epoch) on its own stream, as
fixed-n views choose their view; M is the table's width (--iid-views M) or sample i's own span
length (--iid-views -1: all free images of its class, so the draw is uniform over the whole class).
Backends only gather the chosen rows and execute the augmentation parameters of sample i on them,
so the shown image is scaled exactly like any other input. Which backends take a view pool is
declared in registry.py (`PipelineEntry.view_pool`).
"""

from __future__ import annotations

import torch
from fastmem.pipelines.rng import S_IID_VIEW, counter_randint


def iid_view_choice(seed: int, epoch: int, indices: torch.Tensor, views_per_sample: int | torch.Tensor) -> torch.Tensor:
    """Which of its M images each sample shows at this epoch (int64 in [0, M), uniform; M may be per sample)."""
    return counter_randint(seed, indices, epoch, S_IID_VIEW, views_per_sample)


def shown_pool_rows(rows: torch.Tensor, seed: int, epoch: int, indices: torch.Tensor,
                    counts: torch.Tensor | None = None) -> torch.Tensor:
    """The pool row each sample in `indices` shows at this epoch (on `indices`' device).

    A table (`counts` None): rows[i, c], c uniform in [0, M). Spans: rows[i, 0] + c, c uniform in [0, counts[i]).
    """
    local = indices.to(rows.device)
    if counts is None:
        choice = iid_view_choice(seed, epoch, indices, int(rows.shape[1]))
        return rows[local, choice.to(rows.device)].to(indices.device)
    choice = iid_view_choice(seed, epoch, local, counts[local])  # the counter RNG: same bits on any device
    return (rows[local, 0] + choice).to(indices.device)
