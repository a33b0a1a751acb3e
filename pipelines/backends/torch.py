"""The `torch` backend: a plain DataLoader that executes the shared view parameters per sample (the baseline).

Owns the map-style dataset (one (epoch, sample) key → its view: backends/base.py's per-batch step on a
batch of one, with the reference executor) and the DataLoader wiring (this rank's share of the epoch
order through a sampler, worker processes, pinned memory). For the same (seed, epoch) it yields the same
batches as the `device` backend, one sample at a time on the host, as the reference implementation's
loaders do. The sampler hands the workers (epoch, index) keys, so one DataLoader with persistent workers
serves every epoch: its worker processes start once (not once per epoch) and `close()` ends them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator, Iterator

import numpy as np
import torch
from fastmem.pipelines.backends.base import EpochLoader, ViewStep, execute_views
from fastmem.pipelines.contract import Batch, LoaderOptions
from fastmem.pipelines.executors.select import apply_views_reference
from fastmem.pipelines.view_pool import shown_pool_rows
from torch.utils.data import DataLoader, Dataset, Sampler

from fastmem.data.iid_views import ViewPool


class _ViewDataset(Dataset):
    """uint8 NHWC array → (float CHW view, target, index, view id) per (epoch, sample index) key."""

    def __init__(self, images: torch.Tensor, step: ViewStep, view_pool: ViewPool | None = None) -> None:
        self.images, self.step = images, step
        self.pool_images = None if view_pool is None else torch.as_tensor(view_pool.images).cpu().contiguous()
        self.pool_rows = None if view_pool is None else torch.as_tensor(view_pool.rows, dtype=torch.int64).cpu()
        counts = None if view_pool is None else view_pool.counts  # spans (--iid-views -1) rather than a table
        self.pool_counts = None if counts is None else torch.as_tensor(counts, dtype=torch.int64).cpu()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        epoch, index = key
        one = torch.tensor([index])
        source, rows = self.images, one
        if self.pool_rows is not None:  # i.i.d. views: one of this sample's reserved images
            source, rows = self.pool_images, shown_pool_rows(self.pool_rows, self.step.seed, epoch, one, self.pool_counts)
        view = execute_views(self.step, source, one, epoch, rows=rows, memory_format=torch.contiguous_format)
        return view.images[0], view.targets[0], index, view.view_ids[0]


class _EpochSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, sample index) keys of the order set for the next iteration (this rank's share)."""

    def __init__(self) -> None:
        self.epoch, self.order = 0, []

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, index) for index in self.order])

    def __len__(self) -> int:
        return len(self.order)


def shutdown_workers(loader: DataLoader | None) -> None:
    """End a DataLoader's (persistent) worker processes now, not when its iterator is collected; a no-op without."""
    iterator = getattr(loader, "_iterator", None)  # DataLoader keeps its persistent workers' iterator here
    shutdown = getattr(iterator, "_shutdown_workers", None)  # a single-process iterator has none
    if callable(shutdown):
        shutdown()


class TorchLoader(EpochLoader):
    """DataLoader baseline yielding contract `Batch`es on `options.device`."""

    def __init__(self, images: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor, options: LoaderOptions,
                 *, view_pool: ViewPool | None = None) -> None:
        _, h, w, c = images.shape
        super().__init__(len(images), targets, options, (h, w), c, executor=apply_views_reference)
        host = dataclasses.replace(self.step, targets=self.targets.cpu())  # worker processes read host targets
        self.dataset = _ViewDataset(torch.as_tensor(images).cpu().contiguous(), host, view_pool)
        self._sampler = _EpochSampler()
        self._loader: DataLoader | None = None

    def _data_loader(self) -> DataLoader:
        """The one DataLoader of every epoch (its workers, if any, persist until `close()`)."""
        if self._loader is None:
            o = self.options
            self._loader = DataLoader(
                self.dataset, batch_size=o.batch_size, sampler=self._sampler, num_workers=o.workers,
                pin_memory=o.device.type == "cuda", drop_last=False, persistent_workers=o.workers > 0,
            )
        return self._loader

    def close(self) -> None:
        """End the worker processes (a later iteration starts new ones); safe to call again."""
        loader, self._loader = self._loader, None
        shutdown_workers(loader)

    def __iter__(self) -> Generator[Batch, None, None]:
        o = self.options
        mine, bounds = self.epoch_plan("cpu")
        self._sampler.epoch, self._sampler.order = self.epoch, mine[: bounds[-1][1] if bounds else 0].tolist()
        non_blocking = o.device.type == "cuda"
        for images, targets, indices, view_ids in self._data_loader():
            images = images.to(o.device, dtype=o.dtype, non_blocking=non_blocking).contiguous(memory_format=o.memory_format)
            yield Batch(images, targets.to(o.device, non_blocking=non_blocking), indices.to(o.device), view_ids.to(o.device))
