"""The `torch` backend: a plain DataLoader that executes the shared view parameters per sample (the baseline).

Owns the map-style dataset (one sample → its view: parameters from the counter RNG, pixels from the
reference executor on a batch of one) and the DataLoader wiring (order from sharding.py through a
sampler, worker processes, pinned memory). For the same (seed, epoch) it yields the same batches as
the `device` backend, one sample at a time on the host, as the reference implementation's loaders do.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from fastmem.pipelines.contract import Batch, LoaderOptions
from fastmem.pipelines.executors.reference import apply_views
from fastmem.pipelines.params import AugmentSpec, sample_view_params, view_ids_for, view_targets
from fastmem.pipelines.sharding import EpochLoader, batch_bounds, check_shard_args, epoch_order, shard
from fastmem.pipelines.view_pool import shown_pool_rows
from torch.utils.data import DataLoader, Dataset, Sampler

from fastmem.data.iid_views import ViewPool


class _ViewDataset(Dataset):
    """uint8 NHWC array + targets → (float CHW view, target, index, view id) per sample at the set epoch."""

    def __init__(self, images: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor, options: LoaderOptions,
                 num_classes: int, view_pool: ViewPool | None = None) -> None:
        self.images = torch.as_tensor(images).cpu().contiguous()
        self.pool_images = None if view_pool is None else torch.as_tensor(view_pool.images).cpu().contiguous()
        self.pool_rows = None if view_pool is None else torch.as_tensor(view_pool.rows, dtype=torch.int64).cpu()
        self.targets = torch.as_tensor(targets, dtype=torch.int64).cpu()
        self.spec, self.seed, self.label_seed = options.spec, options.seed, options.label_seed
        self.num_classes = num_classes
        self.epoch = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        one = torch.tensor([index])
        view_id = view_ids_for(self.spec, self.seed, self.epoch, one)
        params = sample_view_params(self.spec, self.seed, one, view_id, tuple(self.images.shape[1:3]), self.images.shape[3])
        source, row = self.images, index
        if self.pool_rows is not None:  # i.i.d. views: one of this sample's reserved images
            source, row = self.pool_images, int(shown_pool_rows(self.pool_rows, self.seed, self.epoch, one)[0])
        image = apply_views(source[row:row + 1], params, channels_last=False)[0]
        target = view_targets(self.spec, self.targets, self.label_seed, one, view_id, self.num_classes)[0]
        return image, target, index, view_id[0]


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
        check_shard_args(len(images), options.batch_size, options.rank, options.world, options.drop_last)
        num_classes = options.num_classes or int(np.asarray(targets).max()) + 1
        self.dataset = _ViewDataset(images, targets, options, num_classes, view_pool)
        self.options = options
        self.spec: AugmentSpec = options.spec
        self.num_samples = len(self.dataset)
        self.epoch = 0

    def __iter__(self) -> Iterator[Batch]:
        o = self.options
        n = len(self.dataset)
        mine = shard(epoch_order(n, o.seed, self.epoch, shuffle=o.shuffle), o.rank, o.world)
        bounds = batch_bounds(n, o.batch_size, o.rank, o.world, o.drop_last)
        self.dataset.epoch = self.epoch  # workers receive a copy of the dataset when the iterator starts
        loader = DataLoader(
            self.dataset, batch_size=o.batch_size, sampler=_OrderSampler(mine[: bounds[-1][1] if bounds else 0].tolist()),
            num_workers=o.workers, pin_memory=o.device.type == "cuda", drop_last=False,
        )
        non_blocking = o.device.type == "cuda"
        for images, targets, indices, view_ids in loader:
            images = images.to(o.device, dtype=o.dtype, non_blocking=non_blocking).contiguous(memory_format=o.memory_format)
            yield Batch(images, targets.to(o.device, non_blocking=non_blocking), indices.to(o.device), view_ids.to(o.device))
