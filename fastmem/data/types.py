"""Dataset containers shared by every source: uint8 NHWC arrays or a list of image files."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ArrayDataset:
    """Images as uint8 NHWC, true labels as int64, and the class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"{self.name}: images must be uint8 NHWC, got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.name}: {self.labels.shape[0]} labels for {self.images.shape[0]} images")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """The samples at `indices`, in that order."""
        return ArrayDataset(self.images[indices], self.labels[indices], self.class_names, self.name)


@dataclass(frozen=True)
class FileDataset:
    """Image files (JPEG/PNG) with true labels and class names; decoded on demand."""

    files: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
