"""Loader backends behind one contract (see `contract.py`); installed as `fastmem.pipelines`."""

from __future__ import annotations

import numpy as np
import torch

from fastmem.errors import fail

from .contract import AUGMENT_NAMES, Batch, Loader, epoch_seed
from .torch_loader import TorchLoader, build_transform

PIPELINE_NAMES: tuple[str, ...] = ("torch",)


def make_loader(
    pipeline: str,
    images: np.ndarray,
    targets: np.ndarray,
    *,
    augment: str = "full",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    workers: int = 0,
    channels_last: bool = True,
) -> Loader:
    """Build a loader over uint8 NHWC `images` with training `targets` using backend `pipeline`."""
    if pipeline not in PIPELINE_NAMES:
        fail(f"unknown pipeline {pipeline!r}; available: {', '.join(PIPELINE_NAMES)}")
    if augment not in AUGMENT_NAMES:
        fail(f"unknown augmentation {augment!r}; known: {', '.join(AUGMENT_NAMES)}")
    return TorchLoader(
        images, targets, augment=augment, batch_size=batch_size, device=torch.device(device), seed=seed,
        shuffle=shuffle, drop_last=drop_last, workers=workers, channels_last=channels_last,
    )


__all__ = ["AUGMENT_NAMES", "Batch", "Loader", "PIPELINE_NAMES", "TorchLoader", "build_transform", "epoch_seed", "make_loader"]
