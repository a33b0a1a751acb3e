"""The `torch` backend: a plain DataLoader that executes the shared view parameters per sample (the baseline).

Owns the map-style dataset (one sample → its view: backends/base.py's per-batch step on a batch of
one, with the reference executor) and the DataLoader wiring (this rank's share of the epoch order
through a sampler, worker processes, pinned memory). For the same (seed, epoch) it yields the same
batches as the `device` backend, one sample at a time on the host, as the reference implementation's
loaders do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from fastmem.pipelines.backends.base import EpochLoader, ViewStep, execute_views
from fastmem.pipelines.contract import Batch, LoaderOptions
from fastmem.pipelines.executors.select import apply_views_reference
from fastmem.pipelines.view_pool import shown_pool_rows
from torch.utils.data import DataLoader, Dataset, Sampler

from fastmem.data.iid_views import ViewPool


class _ViewDataset(Dataset):
    """uint8 NHWC array → (float CHW view, target, index, view id) per sample at the set epoch."""

    def __init__(self, images: torch.Tensor, step: ViewStep, view_pool: ViewPool | None = None) -> None:
        self.images, self.step = images, step
        self.pool_images = None if view_pool is None else torch.as_tensor(view_pool.images).cpu().contiguous()
        self.pool_rows = None if view_pool is None else torch.as_tensor(view_pool.rows, dtype=torch.int64).cpu()
        self.epoch = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        one = torch.tensor([index])
        source, rows = self.images, one
        if self.pool_rows is not None:  # i.i.d. views: one of this sample's reserved images
            source, rows = self.pool_images, shown_pool_rows(self.pool_rows, self.step.seed, self.epoch, one)
        view = execute_views(self.step, source, one, self.epoch, rows=rows, memory_format=torch.contiguous_format)
        return view.images[0], view.targets[0], index, view.view_ids[0]


class _OrderSampler(Sampler[int]):
    """Yields a fixed list of sample indices (this rank's share of the epoch order)."""

    def __init__(self, order: Sequence[int]) -> None:
        self.order = order

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class TorchLoader(EpochLoader):
    """DataLoader baseline yielding contract `Batch`es on `options.device`."""

    def __init__(self, images: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor, options: LoaderOptions,
                 *, view_pool: ViewPool | None = None) -> None:
        _, h, w, c = images.shape
        super().__init__(len(images), targets, options, (h, w), c, executor=apply_views_reference)
        host = dataclasses.replace(self.step, targets=self.targets.cpu())  # worker processes read host targets
        self.dataset = _ViewDataset(torch.as_tensor(images).cpu().contiguous(), host, view_pool)

    def __iter__(self) -> Iterator[Batch]:
        o = self.options
        mine, bounds = self.epoch_plan("cpu")
        self.dataset.epoch = self.epoch  # workers receive a copy of the dataset when the iterator starts
        loader = DataLoader(
            self.dataset, batch_size=o.batch_size, sampler=_OrderSampler(mine[: bounds[-1][1] if bounds else 0].tolist()),
            num_workers=o.workers, pin_memory=o.device.type == "cuda", drop_last=False,
        )
        non_blocking = o.device.type == "cuda"
        for images, targets, indices, view_ids in loader:
            images = images.to(o.device, dtype=o.dtype, non_blocking=non_blocking).contiguous(memory_format=o.memory_format)
            yield Batch(images, targets.to(o.device, non_blocking=non_blocking), indices.to(o.device), view_ids.to(o.device))
