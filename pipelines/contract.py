"""The loader contract every pipeline backend follows.

A loader yields `Batch`es of images (NCHW float in [0, 1], channels_last, on the target device),
training targets, sample indices and view ids; it has `len()` (batches per epoch) and
`set_epoch(e)`, and its order and augmentation are a deterministic function of (seed, epoch).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, Protocol

import torch

AUGMENT_NAMES: tuple[str, ...] = ("none", "standard", "full")


class Batch(NamedTuple):
    images: torch.Tensor
    targets: torch.Tensor
    indices: torch.Tensor
    view_ids: torch.Tensor


class Loader(Protocol):
    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...

    def set_epoch(self, epoch: int) -> None: ...


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for (run seed, epoch), so each epoch's randomness is independent of the others."""
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1)
