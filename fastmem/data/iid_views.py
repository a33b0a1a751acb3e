"""Experiment G's i.i.d. views: M reserved real images of the same true class per training image.

Owns the table: for every training image (anchor) of a run, M images of the same *true* class drawn
from the rest of the training split (never an anchor, so never the anchor itself), disjoint across
anchors, seeded. The loaders get the reserved images and the table as a `ViewPool` and only gather
by index (fastmem/pipelines/view_pool.py draws which one): each load of anchor i shows one of its M images, with
the random label of anchor i and the augmentation of anchor i, scaled like any other input.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from fastmem.data.splits import RunSplits
from fastmem.errors import fail

IID_TABLE_SALT = 0x11D5  # keeps the reserved-image draw independent of the subset and probe draws


class ViewPool(NamedTuple):
    """Reserved images (uint8 NHWC) and, per training sample, the rows of its M reserved images."""

    images: np.ndarray | torch.Tensor  # (P, H, W, C) uint8
    rows: np.ndarray | torch.Tensor  # (N, M) int64 rows of `images`; row n holds sample n's views

    @property
    def views_per_sample(self) -> int:
        return int(self.rows.shape[1])


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



def reserve_same_class_images(
    labels: np.ndarray, anchors: np.ndarray, views_per_anchor: int, seed: int, class_names: tuple[str, ...] = (),
) -> np.ndarray:
    """(N, M) int64 indices into `labels`: for anchor n, M non-anchor images of class labels[anchors[n]].

    Every index appears at most once in the table and never among `anchors`; a pure function of
    (labels, anchors, M, seed). Fails with one line when a class has too few images left.
    """
    labels = np.asarray(labels, dtype=np.int64)
    anchors = np.asarray(anchors, dtype=np.int64)
    if views_per_anchor < 1:
        fail(f"--iid-views must be >= 1 to reserve views, got {views_per_anchor}")
    if len(np.unique(anchors)) != len(anchors):
        fail("i.i.d. views need distinct anchors")
    is_anchor = np.zeros(len(labels), dtype=bool)
    is_anchor[anchors] = True
    rng = np.random.default_rng([seed, IID_TABLE_SALT])
    table = np.empty((len(anchors), views_per_anchor), dtype=np.int64)
    anchor_classes = labels[anchors]
    for cls in np.unique(anchor_classes):  # ascending class order: deterministic
        members = np.flatnonzero(anchor_classes == cls)
        free = np.flatnonzero((labels == cls) & ~is_anchor)
        needed = len(members) * views_per_anchor
        if len(free) < needed:
            name = class_names[cls] if cls < len(class_names) else str(cls)
            fail(f"--iid-views {views_per_anchor} needs {needed} more training images of class {name!r} "
                 f"({len(members)} anchors × {views_per_anchor}) but only {len(free)} are left outside the "
                 f"{len(anchors)} training images; use a smaller --subset or --iid-views")
        table[members] = rng.permutation(free)[:needed].reshape(len(members), views_per_anchor)
    return table


def build_iid_view_pool(splits: RunSplits, views_per_anchor: int, seed: int) -> ViewPool:
    """The reserved images of a run's training subset as a loader's `ViewPool` (images in table order)."""
    full = splits.full_train
    table = reserve_same_class_images(full.labels, splits.train_indices, views_per_anchor, seed, full.class_names)
    images = full.images[table.reshape(-1)]  # uint8, exactly the split's pixels: scaled later like any input
    rows = np.arange(table.size, dtype=np.int64).reshape(table.shape)
    return ViewPool(images, rows)
