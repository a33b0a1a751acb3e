"""The loader contract every pipeline backend follows.

A loader yields `Batch`es of images (NCHW float in [0, 1], channels_last unless asked otherwise, on
the target device, in the requested dtype), training targets (per view for fixed `random` views),
sample indices and view ids; it has `len()` (batches per epoch on its rank), `set_epoch(e)`, `spec`
and `num_views`. One epoch's iteration is a generator: its `close()` ends the epoch early and lets go of what
that epoch holds. The loader's `close()` (idempotent; also on leaving a `with make_loader(...) as loader:`
block) releases what it holds beyond memory: worker processes, threads, pipelines; a later iteration starts
them again. Its order is `sharding.epoch_order` split by `sharding.shard`, and its views are
the parameters of `params.sample_view_params` executed on the images, so everything is a
deterministic function of (seed, epoch) and equal across backends up to the executor's tolerance.
Backends are built as `Backend(images, targets, options, **backend_options)` from uint8 NHWC images
(numpy or torch), int64 targets and a `LoaderOptions`; they derive from `backends.base.EpochLoader`,
and registry.py declares what each executes and which backend options it takes.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from types import TracebackType
from typing import NamedTuple, Protocol, TypeVar

import torch
from fastmem.pipelines.params import AUGMENT_NAMES, AugmentSpec

__all__ = ["AUGMENT_NAMES", "Batch", "Loader", "LoaderOptions"]

SelfLoader = TypeVar("SelfLoader", bound="Loader")


class Batch(NamedTuple):
    images: torch.Tensor  # (B, C, H, W) float in [0, 1]
    targets: torch.Tensor  # (B,) int64 training targets of these views
    indices: torch.Tensor  # (B,) int64 sample indices into the source
    view_ids: torch.Tensor  # (B,) int64 view ids (the epoch, or a fixed view in [0, N))


@dataclass(frozen=True)
class LoaderOptions:
    """Everything a backend needs besides the data; `make_loader` validates it."""

    spec: AugmentSpec = field(default_factory=AugmentSpec)
    batch_size: int = 256
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0  # order, view choice and view parameters
    label_seed: int = 0  # per-view labels of fixed `random` views
    shuffle: bool = True
    drop_last: bool = True
    rank: int = 0
    world: int = 1
    workers: int = 0  # host worker processes, for backends that have them
    channels_last: bool = True
    dtype: torch.dtype = torch.float32
    num_classes: int = 0  # classes of the per-view labels; 0 = max(targets) + 1 (backends/base.py)

    @property
    def memory_format(self) -> torch.memory_format:
        """channels_last or contiguous NCHW."""
        return torch.channels_last if self.channels_last else torch.contiguous_format


class Loader(Protocol):
    spec: AugmentSpec

    @property
    def num_views(self) -> int | None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Generator[Batch, None, None]: ...

    def set_epoch(self, epoch: int) -> None: ...

    def close(self) -> None: ...

    def __enter__(self: SelfLoader) -> SelfLoader: ...

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None: ...

