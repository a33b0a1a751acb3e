"""The `device` backend: the dataset resident on the target device, whole-batch augmentation.

Owns the uint8 dataset upload (once) and the grouping of batches per executor call; the order, the
targets and the per-batch step (view ids, parameters, output buffer, executor, per-view targets)
are backends/base.py's. By default the executor is the fused one for the device (executors/select.py),
reading the resident rows in place: no gather copy, no per-sample Python and, on CUDA, no host
round trip except the executor's hue grouping. On CUDA, for the kinds it draws (none, standard, full,
fullfixed) and with the default executor, the parameters are drawn inside the executor's kernel
(executors/fused_cuda_sampled.py, the in-kernel twin of params.sample_view_params, bit-identical to
it): one launch per call and no parameter tensors. Elsewhere (CPU, RandAugment, another executor)
the shared step samples then executes, unchanged. Several batches are augmented per executor call
(on CUDA to amortize kernel launches, on CPU the sampler's per-call overhead).
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
import torch
from fastmem.pipelines.backends.base import EpochLoader, Executor, view_output
from fastmem.pipelines.contract import Batch, LoaderOptions
from fastmem.pipelines.executors import fused_cuda_sampled
from fastmem.pipelines.executors.select import apply_views_fastest
from fastmem.pipelines.view_pool import shown_pool_rows

from fastmem.data.iid_views import ViewPool

CUDA_VIEW_ELEMENTS = 1 << 26  # output values per executor call on CUDA (256 MB in fp32; ~22k views at 32 px)
CPU_BATCHES_PER_CALL = 8  # amortizes the parameter sampler's per-call overhead on CPU


class DeviceLoader(EpochLoader):
    """Dataset on `options.device` as uint8 NHWC; yields contract `Batch`es augmented there."""

    def __init__(
        self, images: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor, options: LoaderOptions,
        executor: Executor = apply_views_fastest, *, view_pool: ViewPool | None = None,
    ) -> None:
        _, h, w, c = images.shape
        super().__init__(len(images), targets, options, (h, w), c, executor=executor)
        device = options.device
        self.images = torch.as_tensor(images).to(device).contiguous()  # uploaded once
        # i.i.d. views: the reserved images on the device too; each load gathers one of sample i's rows.
        self.pool_images = None if view_pool is None else torch.as_tensor(view_pool.images).to(device).contiguous()
        self.pool_rows = None if view_pool is None else torch.as_tensor(view_pool.rows, dtype=torch.int64).to(device)
        counts = None if view_pool is None else view_pool.counts  # spans (--iid-views -1) rather than a table
        self.pool_counts = None if counts is None else torch.as_tensor(counts, dtype=torch.int64).to(device)
        if device.type == "cuda":
            self.batches_per_call = max(1, CUDA_VIEW_ELEMENTS // (options.batch_size * c * h * w))
        else:
            self.batches_per_call = CPU_BATCHES_PER_CALL
        # Draw the parameters in the executor's kernel where the default executor would run the fused Triton one.
        self.samples_in_kernel = (executor is apply_views_fastest and device.type == "cuda"
                                  and fused_cuda_sampled.supports(options.spec, self.images))

    def __iter__(self) -> Generator[Batch, None, None]:
        mine, bounds = self.epoch_plan()
        for first in range(0, len(bounds), self.batches_per_call):
            group = bounds[first:first + self.batches_per_call]
            start, stop = group[0][0], group[-1][1]
            images, targets, indices, view_ids = self.resident_views(mine[start:stop])
            for lo, hi in group:
                part = slice(lo - start, hi - start)
                yield Batch(images[part], targets[part], indices[part], view_ids[part])

    def resident_views(self, indices: torch.Tensor) -> Batch:
        """The views of `indices` at the current epoch, read from the resident images (or view pool) in place."""
        if self.pool_rows is None:
            return self.views(self.images, indices, rows=indices)
        rows = shown_pool_rows(self.pool_rows, self.options.seed, self.epoch, indices, self.pool_counts)
        return self.views(self.pool_images, indices, rows=rows)

    def views(self, pixels: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor | None = None) -> Batch:
        """The current epoch's views of `indices` from `pixels` (or `pixels[rows]`), drawn in-kernel if enabled."""
        if not self.samples_in_kernel:
            return super().views(pixels, indices, rows)
        o, step = self.options, self.step
        indices = indices.to(o.device)
        view_ids = self.view_ids(indices)
        out = view_output(step, indices, o.dtype, o.memory_format)
        images = fused_cuda_sampled.apply_sampled_views(pixels, self.spec, o.seed, indices, view_ids, out, rows=rows)
        return Batch(images, step.targets_of(indices, view_ids), indices, view_ids)
