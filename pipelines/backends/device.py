"""The `device` backend: the dataset resident on the target device, whole-batch augmentation.

Owns the uint8 dataset upload (once), the per-epoch order on the device, and batching: each batch's
indices, view ids, parameters (params.py), pixels (an executor; by default the fused one for the device, see fastest.py) and
targets. No per-sample Python and, on CUDA, no host round trip except the executor's hue grouping;
several batches are augmented per executor call on CUDA to amortize kernel launches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from fastmem.pipelines.contract import Batch, LoaderOptions
from fastmem.pipelines.executors.select import apply_views_fastest
from fastmem.pipelines.params import AugmentSpec, ViewParams, sample_view_params, view_ids_for, view_targets
from fastmem.pipelines.sharding import EpochLoader, batch_bounds, check_shard_args, epoch_order, shard
from fastmem.pipelines.view_pool import shown_pool_rows

from fastmem.data.iid_views import ViewPool

Executor = Callable[[torch.Tensor, ViewParams, torch.Tensor | None, bool], torch.Tensor]
CUDA_VIEW_ELEMENTS = 1 << 26  # output values per executor call on CUDA (256 MB in fp32; ~22k views at 32 px)
CPU_BATCHES_PER_CALL = 8  # amortizes the parameter sampler's per-call overhead on CPU


class DeviceLoader(EpochLoader):
    """Dataset on `options.device` as uint8 NHWC; yields contract `Batch`es augmented there."""

    def __init__(
        self, images: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor, options: LoaderOptions,
        executor: Executor = apply_views_fastest, *, view_pool: ViewPool | None = None,
    ) -> None:
        check_shard_args(len(images), options.batch_size, options.rank, options.world, options.drop_last)
        self.options, self.executor = options, executor
        self.spec: AugmentSpec = options.spec
        device = options.device
        self.images = torch.as_tensor(images).to(device).contiguous()  # uploaded once
        self.targets = torch.as_tensor(np.asarray(targets) if not torch.is_tensor(targets) else targets,
                                       dtype=torch.int64).to(device)
        self.num_classes = options.num_classes or int(self.targets.max()) + 1
        _, h, w, c = self.images.shape
        self.image_size, self.channels = (int(h), int(w)), int(c)
        self.num_samples = len(self.images)
        # i.i.d. views: the reserved images on the device too; each load gathers one of sample i's rows.
        self.pool_images = None if view_pool is None else torch.as_tensor(view_pool.images).to(device).contiguous()
        self.pool_rows = None if view_pool is None else torch.as_tensor(view_pool.rows, dtype=torch.int64).to(device)
        self.epoch = 0
        if device.type == "cuda":
            self.batches_per_call = max(1, CUDA_VIEW_ELEMENTS // (options.batch_size * c * h * w))
        else:
            self.batches_per_call = CPU_BATCHES_PER_CALL

    def __iter__(self) -> Iterator[Batch]:
        o = self.options
        order = epoch_order(len(self.images), o.seed, self.epoch, shuffle=o.shuffle, device=o.device)
        mine = shard(order, o.rank, o.world)
        bounds = batch_bounds(len(self.images), o.batch_size, o.rank, o.world, o.drop_last)
        for first in range(0, len(bounds), self.batches_per_call):
            group = bounds[first:first + self.batches_per_call]
            start, stop = group[0][0], group[-1][1]
            images, targets, indices, view_ids = self.views(mine[start:stop])
            for lo, hi in group:
                part = slice(lo - start, hi - start)
                yield Batch(images[part], targets[part], indices[part], view_ids[part])

    def views(self, indices: torch.Tensor) -> Batch:
        """The views of `indices` at the current epoch (images augmented, targets per view)."""
        o = self.options
        view_ids = view_ids_for(self.spec, o.seed, self.epoch, indices)
        params = sample_view_params(self.spec, o.seed, indices, view_ids, self.image_size, self.channels)
        out = torch.empty((len(indices), self.channels, *self.image_size), dtype=o.dtype, device=o.device,
                          memory_format=o.memory_format)
        source, rows = self.images, indices
        if self.pool_rows is not None:
            source, rows = self.pool_images, shown_pool_rows(self.pool_rows, o.seed, self.epoch, indices)
        if self.executor is apply_views_fastest:
            images = apply_views_fastest(source, params, out, o.channels_last, rows=rows)
        else:
            images = self.executor(source[rows], params, out, o.channels_last)
        targets = view_targets(self.spec, self.targets, o.label_seed, indices, view_ids, self.num_classes)
        return Batch(images, targets, indices, view_ids)
