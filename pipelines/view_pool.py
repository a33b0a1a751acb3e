"""i.i.d. views: each load of training sample i shows one of its M reserved images instead of image i.

Owns the per-load choice among a `ViewPool`'s images (the pool itself, and which images are
reserved for which sample, belong to the data it is drawn from: fastmem/data/iid_views.py): a
uniform draw in [0, M) from the counter RNG keyed by (seed, sample, epoch) on its own stream, as
fixed-n views choose their view. Backends only gather the chosen rows and execute the augmentation
parameters of sample i on them, so the shown image is scaled exactly like any other input. Which
backends take a view pool is declared in registry.py (`PipelineEntry.view_pool`).
"""

from __future__ import annotations

import torch
from fastmem.pipelines.rng import S_IID_VIEW, counter_randint


def iid_view_choice(seed: int, epoch: int, indices: torch.Tensor, views_per_sample: int) -> torch.Tensor:
    """Which of its M reserved images each sample shows at this epoch (int64 in [0, M), uniform)."""
    return counter_randint(seed, indices, epoch, S_IID_VIEW, views_per_sample)


def shown_pool_rows(rows: torch.Tensor, seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
    """The pool row each sample in `indices` shows at this epoch (on `indices`' device)."""
    choice = iid_view_choice(seed, epoch, indices, int(rows.shape[1]))
    return rows[indices.to(rows.device), choice.to(rows.device)].to(indices.device)
