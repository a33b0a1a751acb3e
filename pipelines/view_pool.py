"""i.i.d. views: each load of training sample i shows one of its M reserved images instead of image i.

Owns the `ViewPool` a loader receives (the reserved uint8 images and, per training sample, the rows
of its M reserved images) and the per-load choice among them: a uniform draw in [0, M) from the
counter RNG keyed by (seed, sample, epoch) on its own stream, as fixed-n views choose their view.
Backends only gather the chosen rows and execute the augmentation parameters of sample i on them,
so the shown image is scaled exactly like any other input. Which images are reserved for which
sample is decided elsewhere (fastmem/data/iid_views.py); this module never looks at labels.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from fastmem.errors import fail

from .params import S_IID_VIEW, counter_randint

# Backends that gather pool rows; the others refuse a view pool with one line.
VIEW_POOL_PIPELINES: tuple[str, ...] = ("device", "torch")


class ViewPool(NamedTuple):
    """Reserved images (uint8 NHWC) and, per training sample, the rows of its M reserved images."""

    images: np.ndarray | torch.Tensor  # (P, H, W, C) uint8
    rows: np.ndarray | torch.Tensor  # (N, M) int64 rows of `images`; row n holds sample n's views

    @property
    def views_per_sample(self) -> int:
        return int(self.rows.shape[1])


def check_view_pool_pipeline(pipeline: str) -> None:
    """One line when `pipeline` cannot show i.i.d. views."""
    if pipeline not in VIEW_POOL_PIPELINES:
        fail(f"--iid-views is supported by the {' and '.join(VIEW_POOL_PIPELINES)} pipelines, not {pipeline!r}")


def check_view_pool(pool: ViewPool, num_samples: int, image_shape: tuple[int, ...]) -> None:
    """Fail with one line when the pool does not fit `num_samples` images of shape (H, W, C)."""
    images, rows = pool.images, pool.rows
    uint8 = images.dtype == (torch.uint8 if isinstance(images, torch.Tensor) else np.uint8)
    if not uint8 or tuple(images.shape[1:]) != tuple(image_shape):
        fail(f"view pool images must be uint8 {tuple(image_shape)} like the training images, "
             f"got {images.dtype} {tuple(images.shape[1:])}")
    if rows.ndim != 2 or rows.shape[0] != num_samples or rows.shape[1] < 1:
        fail(f"view pool rows must be (samples={num_samples}, M >= 1), got {tuple(rows.shape)}")
    if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= images.shape[0]):
        fail(f"view pool rows must index its {images.shape[0]} images")


def iid_view_choice(seed: int, epoch: int, indices: torch.Tensor, views_per_sample: int) -> torch.Tensor:
    """Which of its M reserved images each sample shows at this epoch (int64 in [0, M), uniform)."""
    return counter_randint(seed, indices, epoch, S_IID_VIEW, views_per_sample)


def shown_pool_rows(rows: torch.Tensor, seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
    """The pool row each sample in `indices` shows at this epoch (on `indices`' device)."""
    choice = iid_view_choice(seed, epoch, indices, int(rows.shape[1]))
    return rows[indices.to(rows.device), choice.to(rows.device)].to(indices.device)
