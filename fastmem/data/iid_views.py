"""Experiment G's i.i.d. views: real images of the same true class shown in place of each training image.

Owns which images each training image (anchor) of a run may show, in one of two forms:

* `--iid-views M` (M >= 1), reserved: M images of the anchor's *true* class drawn from the rest of the
  training split (never an anchor, so never the anchor itself), disjoint across anchors, seeded; a table.
* `--iid-views -1` (SHARED_VIEWS), shared: *every* image of the anchor's true class outside the training
  subset, the same pool for all anchors of that class. The pool stores each such image once, grouped by
  class (ascending class, then ascending split index), and anchor i's views are the contiguous span of
  its class: a start row and a count per anchor (O(N) ints, never an (N, M) table), so each load draws
  uniformly over the class's *whole* pool, however unequal the classes' counts (no truncation).

The loaders get the images and the table or spans as a `ViewPool` and only gather by index
(fastmem/pipelines/view_pool.py draws which one): each load of anchor i shows one of its images, with
the random label of anchor i and the augmentation of anchor i, scaled like any other input.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from fastmem.data.splits import RunSplits
from fastmem.errors import fail

IID_TABLE_SALT = 0x11D5  # keeps the reserved-image draw independent of the subset and probe draws
SHARED_VIEWS = -1  # --iid-views -1: every same-class image outside the subset, shared across anchors


class ViewPool(NamedTuple):
    """Pool images (uint8 NHWC) and, per training sample, which of them it shows: a table or spans.

    Table (`counts` None): `rows` is (N, M); sample n shows images[rows[n, c]], c uniform in [0, M).
    Spans (`counts` (N,)): `rows` is (N, 1); sample n shows images[rows[n, 0] + c], c uniform in
    [0, counts[n]): its views are one contiguous run of the pool, which several samples may share.
    """

    images: np.ndarray | torch.Tensor  # (P, H, W, C) uint8
    rows: np.ndarray | torch.Tensor  # (N, M) int64 rows of `images`, or (N, 1) span starts with `counts`
    counts: np.ndarray | torch.Tensor | None = None  # (N,) int64 span lengths (>= 1); None for a table

    @property
    def views_per_sample(self) -> int:
        """M of a table; the fewest views of any sample with spans."""
        if self.counts is None:
            return int(self.rows.shape[1])
        return int(self.counts.min()) if len(self.counts) else 0


def check_view_pool(pool: ViewPool, num_samples: int, image_shape: tuple[int, ...]) -> None:
    """Fail with one line when the pool does not fit `num_samples` images of shape (H, W, C)."""
    images, rows = pool.images, pool.rows
    uint8 = images.dtype == (torch.uint8 if isinstance(images, torch.Tensor) else np.uint8)
    if not uint8 or tuple(images.shape[1:]) != tuple(image_shape):
        fail(f"view pool images must be uint8 {tuple(image_shape)} like the training images, "
             f"got {images.dtype} {tuple(images.shape[1:])}")
    if pool.counts is not None:
        _check_spans(rows, pool.counts, num_samples, images.shape[0])
        return
    if rows.ndim != 2 or rows.shape[0] != num_samples or rows.shape[1] < 1:
        fail(f"view pool rows must be (samples={num_samples}, M >= 1), got {tuple(rows.shape)}")
    if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= images.shape[0]):
        fail(f"view pool rows must index its {images.shape[0]} images")


def _check_spans(starts: np.ndarray | torch.Tensor, counts: np.ndarray | torch.Tensor, num_samples: int,
                 pool_size: int) -> None:
    """Fail with one line unless (N, 1) `starts` and (N,) `counts` are non-empty runs inside the pool."""
    if tuple(starts.shape) != (num_samples, 1) or tuple(counts.shape) != (num_samples,):
        fail(f"view pool spans must be rows (samples={num_samples}, 1) and counts ({num_samples},), "
             f"got {tuple(starts.shape)} and {tuple(counts.shape)}")
    first = torch.as_tensor(starts).cpu().reshape(-1)
    length = torch.as_tensor(counts).cpu()
    if num_samples and (int(length.min()) < 1 or int(first.min()) < 0 or int((first + length).max()) > pool_size):
        fail(f"view pool spans must be non-empty runs of its {pool_size} images")


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


def share_same_class_images(
    labels: np.ndarray, anchors: np.ndarray, class_names: tuple[str, ...] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(members, starts, counts): every non-anchor image of every anchor class, and each anchor's span of it.

    `members` (P,) int64 indices into `labels`: the images of the anchors' classes that are not anchors,
    grouped by class in ascending class order, ascending index within a class (each image once). Anchor
    n's views are members[starts[n] : starts[n] + counts[n]], all of its class's free images; anchors of
    one class share one span. A pure function of (labels, anchors): nothing is drawn. Fails with one line
    when a class of the anchors has no image left outside them.
    """
    labels = np.asarray(labels, dtype=np.int64)
    anchors = np.asarray(anchors, dtype=np.int64)
    if len(np.unique(anchors)) != len(anchors):
        fail("i.i.d. views need distinct anchors")
    is_anchor = np.zeros(len(labels), dtype=bool)
    is_anchor[anchors] = True
    anchor_classes = labels[anchors]
    starts = np.empty(len(anchors), dtype=np.int64)
    counts = np.empty(len(anchors), dtype=np.int64)
    groups, start = [], 0
    for cls in np.unique(anchor_classes):  # ascending class order: deterministic
        free = np.flatnonzero((labels == cls) & ~is_anchor)
        if not len(free):
            name = class_names[cls] if cls < len(class_names) else str(cls)
            fail(f"--iid-views {SHARED_VIEWS} needs training images of class {name!r} outside the {len(anchors)} "
                 f"training images, but all {int((labels == cls).sum())} are among them; use a smaller --subset")
        members = anchor_classes == cls
        starts[members], counts[members] = start, len(free)
        groups.append(free)
        start += len(free)
    return np.concatenate(groups) if groups else np.empty(0, dtype=np.int64), starts, counts


def build_iid_view_pool(splits: RunSplits, views_per_anchor: int, seed: int) -> ViewPool:
    """The view images of a run's training subset as a loader's `ViewPool`.

    `views_per_anchor` M >= 1: the reserved images in table order, rows an (N, M) table. SHARED_VIEWS (-1):
    each free image of the anchors' classes once, rows (N, 1) span starts and counts (N,) (`seed` unused).
    """
    full = splits.full_train
    if views_per_anchor == SHARED_VIEWS:
        members, starts, counts = share_same_class_images(full.labels, splits.train_indices, full.class_names)
        return ViewPool(full.images[members], starts[:, None], counts)
    table = reserve_same_class_images(full.labels, splits.train_indices, views_per_anchor, seed, full.class_names)
    images = full.images[table.reshape(-1)]  # uint8, exactly the split's pixels: scaled later like any input
    rows = np.arange(table.size, dtype=np.int64).reshape(table.shape)
    return ViewPool(images, rows)
