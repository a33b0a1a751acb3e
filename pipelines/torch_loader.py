"""The `torch` backend: a plain DataLoader with per-sample torchvision v2 transforms (the baseline).

Owns the per-sample transforms for the named augmentation sets and the DataLoader wiring.
Augmentation randomness comes from torch's RNG, seeded per (seed, epoch) in the main process and
per worker by the DataLoader, so an epoch is reproducible and a resumed run matches an
uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from fastmem.errors import fail

from .contract import AUGMENT_NAMES, Batch, epoch_seed


def build_transform(augment: str, image_size: int, channels: int) -> v2.Compose:
    """Per-sample v2 transform on a uint8 CHW tensor, ending in float32 in [0, 1].

    `full` is the paper's SimCLR set without blur. Saturation, hue and grayscale need colour, so
    1-channel inputs get brightness and contrast jitter only.
    """
    to_float = v2.ToDtype(torch.float32, scale=True)
    if augment == "none":
        return v2.Compose([to_float])
    if augment == "standard":
        return v2.Compose([
            v2.RandomCrop(image_size, padding=image_size // 8, padding_mode="reflect"),
            v2.RandomHorizontalFlip(),
            to_float,
        ])
    if augment == "full":
        colour = channels == 3
        jitter = v2.ColorJitter(0.8, 0.8, 0.8 if colour else 0.0, 0.2 if colour else 0.0)
        steps: list[v2.Transform] = [
            v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([jitter], p=0.8),
        ]
        if colour:
            steps.append(v2.RandomGrayscale(p=0.2))
        return v2.Compose(steps + [to_float])
    fail(f"unknown augmentation {augment!r}; known: {', '.join(AUGMENT_NAMES)}")


class _ArrayDataset(Dataset):
    """uint8 NHWC array + targets → (float CHW image, target, index) per sample."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, transform: v2.Compose) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        self.targets = torch.as_tensor(targets, dtype=torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), self.targets[index], index


class TorchLoader:
    """DataLoader baseline yielding `Batch`es on `device`, channels_last."""

    def __init__(
        self,
        images: np.ndarray,
        targets: np.ndarray,
        *,
        augment: str,
        batch_size: int,
        device: torch.device,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        workers: int = 0,
        channels_last: bool = True,
    ) -> None:
        if batch_size < 1:
            fail(f"--batch-size must be positive, got {batch_size}")
        if drop_last and len(images) < batch_size:
            fail(f"dataset has {len(images)} samples, fewer than one batch of {batch_size} (drop_last)")
        transform = build_transform(augment, int(images.shape[1]), int(images.shape[3]))
        self.dataset = _ArrayDataset(images, targets, transform)
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.shuffle, self.drop_last, self.workers = shuffle, drop_last, workers
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=self.shuffle, drop_last=self.drop_last,
            num_workers=self.workers, generator=generator, pin_memory=self.device.type == "cuda",
        )
        # Main-process transforms draw from the global RNG: seed it per epoch too (workers are seeded
        # by the DataLoader from `generator`).
        torch.manual_seed(epoch_seed(self.seed + 1, self.epoch))
        non_blocking = self.device.type == "cuda"
        for images, targets, indices in loader:
            images = images.to(self.device, non_blocking=non_blocking).contiguous(memory_format=self.memory_format)
            yield Batch(images, targets.to(self.device, non_blocking=non_blocking), indices, torch.zeros_like(indices))
