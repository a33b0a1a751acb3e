"""What every backend shares: the epoch, its order and shards, the targets and the per-batch step.

Owns `EpochLoader`, the base of every backend: it checks the shard arguments, holds the targets
(int64 on the target device, coerced once) and the number of classes (`options.num_classes`, else
max(target) + 1), plans each epoch (sharding.py's order, this rank's shard and batch bounds) and
turns a batch's sample indices plus its pixels into a contract `Batch` (`execute_views`: view ids →
parameters → a preallocated output in the requested dtype and memory format → the executor chosen by
executors/select.py → per-view targets). A backend supplies only the pixels of the indices it is
given, and overrides `close()` when it holds worker processes, threads or a pipeline (`with` calls it on
exit). `execute_views` is a module-level function of a picklable `ViewStep`, so a DataLoader's
worker processes (the torch backend) run the same step on batches of one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

import numpy as np
import torch
from fastmem.pipelines.contract import Batch, LoaderOptions
from fastmem.pipelines.executors.select import apply_views_fastest
from fastmem.pipelines.params import AugmentSpec, ViewParams, sample_view_params, view_ids_for, view_targets
from fastmem.pipelines.sharding import batch_bounds, batches_per_epoch, check_shard_args, epoch_order, shard

from fastmem.errors import fail

# apply_views_fastest's signature: (uint8 images, params, out, channels_last, *, rows=None) → float views.
Executor = Callable[..., torch.Tensor]
SelfLoader = TypeVar("SelfLoader", bound="EpochLoader")


def coerce_targets(targets: np.ndarray | torch.Tensor, count: int, device: torch.device | str) -> torch.Tensor:
    """The targets as int64 on `device`, one per sample; one line when their number is wrong."""
    tensor = targets if torch.is_tensor(targets) else torch.as_tensor(np.asarray(targets))
    tensor = tensor.to(device=device, dtype=torch.int64)
    if tuple(tensor.shape) != (count,):
        fail(f"{tuple(tensor.shape)} targets for {count} samples")
    return tensor


@dataclass(frozen=True)
class ViewStep:
    """Everything `execute_views` needs besides a batch's pixels, indices and epoch (picklable)."""

    spec: AugmentSpec
    seed: int
    label_seed: int
    targets: torch.Tensor  # int64 per sample; per-view targets are gathered from it
    num_classes: int  # classes of fixed `random` views' labels
    image_size: tuple[int, int]
    channels: int
    executor: Executor = apply_views_fastest

    def params(self, indices: torch.Tensor, view_ids: torch.Tensor) -> ViewParams:
        """The views' parameters, drawn by the one sampler (params.py)."""
        return sample_view_params(self.spec, self.seed, indices, view_ids, self.image_size, self.channels)

    def targets_of(self, indices: torch.Tensor, view_ids: torch.Tensor) -> torch.Tensor:
        """Training target per view (on the indices' device)."""
        return view_targets(self.spec, self.targets, self.label_seed, indices, view_ids, self.num_classes)


def execute_views(
    step: ViewStep, pixels: torch.Tensor, indices: torch.Tensor, epoch: int, *, rows: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32, memory_format: torch.memory_format = torch.channels_last,
) -> Batch:
    """The per-batch step: the views of samples `indices` at `epoch` from uint8 `pixels` (or `pixels[rows]`).

    The output is allocated here in `dtype` and `memory_format` on the indices' device and filled by
    the step's executor (the fastest one that implements every op of the views, by default).
    """
    view_ids = view_ids_for(step.spec, step.seed, epoch, indices)
    params = step.params(indices, view_ids)
    out = view_output(step, indices, dtype, memory_format)
    images = step.executor(pixels, params, out, memory_format == torch.channels_last, rows=rows)
    return Batch(images, step.targets_of(indices, view_ids), indices, view_ids)


def view_output(
    step: ViewStep, indices: torch.Tensor, dtype: torch.dtype, memory_format: torch.memory_format,
) -> torch.Tensor:
    """The uninitialized (B, C, H, W) output of the views of `indices`, on their device."""
    return torch.empty((len(indices), step.channels, *step.image_size), dtype=dtype, device=indices.device,
                       memory_format=memory_format)


class EpochLoader:
    """Base of every backend: the epoch knob, views per sample, batches per epoch, order, targets, views.

    A backend calls `__init__` once it knows how many samples it has and their size, then yields
    `self.views(pixels, indices)` for the index batches of `self.batch_indices()` (or of `epoch_plan`).
    """

    def __init__(
        self, num_samples: int, targets: np.ndarray | torch.Tensor, options: LoaderOptions,
        image_size: tuple[int, int], channels: int, *, executor: Executor = apply_views_fastest,
    ) -> None:
        check_shard_args(num_samples, options.batch_size, options.rank, options.world, options.drop_last)
        self.options, self.spec = options, options.spec
        self.num_samples, self.epoch = num_samples, 0
        self.image_size, self.channels = (int(image_size[0]), int(image_size[1])), int(channels)
        self.targets = coerce_targets(targets, num_samples, options.device)
        self.num_classes = options.num_classes or int(self.targets.max()) + 1
        self.step = ViewStep(options.spec, options.seed, options.label_seed, self.targets, self.num_classes,
                             self.image_size, self.channels, executor)

    @property
    def num_views(self) -> int | None:
        """Views per sample: N for fixed views, 1 for none, None for a fresh view every epoch."""
        return self.spec.num_views

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and views the next iteration yields."""
        self.epoch = epoch

    def close(self) -> None:
        """Release worker processes, threads or pipelines; safe to call again, and a later iteration restarts them.

        Nothing to release here (the device backend holds memory only); backends that hold more override it.
        """

    def __enter__(self: SelfLoader) -> SelfLoader:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def __len__(self) -> int:
        o = self.options
        return batches_per_epoch(self.num_samples, o.batch_size, o.rank, o.world, o.drop_last)

    def epoch_plan(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """This rank's share of the epoch order (on `device`, default the target device) and each batch's bounds in it."""
        o = self.options
        order = epoch_order(self.num_samples, o.seed, self.epoch, shuffle=o.shuffle, device=o.device if device is None else device)
        return shard(order, o.rank, o.world), batch_bounds(self.num_samples, o.batch_size, o.rank, o.world, o.drop_last)

    def batch_indices(self, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """The sample indices of each of this epoch's batches on this rank, in order."""
        mine, bounds = self.epoch_plan(device)
        return [mine[lo:hi] for lo, hi in bounds]

    def view_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """The view id of each sample at the current epoch."""
        return view_ids_for(self.spec, self.options.seed, self.epoch, indices)

    def views(self, pixels: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor | None = None) -> Batch:
        """The current epoch's views of `indices` (on the target device) from `pixels` (or `pixels[rows]`)."""
        o = self.options
        return execute_views(self.step, pixels, indices.to(o.device), self.epoch, rows=rows, dtype=o.dtype,
                             memory_format=o.memory_format)
