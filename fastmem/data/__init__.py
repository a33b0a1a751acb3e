"""Data sources: one entry point that maps a dataset name and split to images and true labels.

Owns the dataset-name registry (with aliases) and dispatch to the per-format modules
(idx: Fashion-MNIST, cifar: CIFAR-10/100, imagefolder: JPEG/PNG trees, synthetic: procedural),
plus `load_arrays`, which always returns uint8 NHWC arrays (decoding file datasets) for the trainer.
"""

from __future__ import annotations

from pathlib import Path

from fastmem.data.types import ArrayDataset, FileDataset
from fastmem.errors import fail

__all__ = ["ArrayDataset", "FileDataset", "DATASET_NAMES", "SPLITS", "canonical_name", "load_dataset", "load_arrays"]

DATASET_NAMES: tuple[str, ...] = ("fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
SPLITS: tuple[str, ...] = ("train", "test")
_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
    "image-folder": "imagefolder",
    "image_folder": "imagefolder",
}
_NATIVE_SIZE = {"fashion-mnist": 28, "cifar10": 32, "cifar100": 32}
DEFAULT_DECODE_SIZE = 64


def canonical_name(name: str) -> str:
    """The registry name for `name` (aliases and case folded); unknown names are a FastmemError."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        fail(f"unknown dataset {name!r} (known: {', '.join(DATASET_NAMES)}; aliases: {', '.join(sorted(_ALIASES))})")
    return key


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | Path | None = None,
    *,
    synthetic_size: int = 5000,
    image_size: int | None = None,
    seed: int = 0,
) -> ArrayDataset | FileDataset:
    """Load `split` ('train'/'test') of a named dataset as arrays, or as a file list for imagefolder."""
    key = canonical_name(name)
    if split not in SPLITS:
        fail(f"{key}: unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    if image_size is not None and image_size <= 0:
        fail(f"{key}: image size must be positive, got {image_size}")
    native = _NATIVE_SIZE.get(key)
    if native is not None and image_size not in (None, native):
        fail(f"{key}: images are {native}×{native}; image size {image_size} does not apply (leave it unset)")
    if key == "fashion-mnist":
        from fastmem.data.idx import load_fashion_mnist

        return load_fashion_mnist(split, data_dir)
    if key in ("cifar10", "cifar100"):
        from fastmem.data.cifar import load_cifar

        return load_cifar(key, split, data_dir)
    if key == "imagefolder":
        from fastmem.data.imagefolder import load_imagefolder

        if data_dir is None:
            fail("imagefolder: needs a data directory (--data-dir ROOT with train/ and val/ or test/)")
        return load_imagefolder(data_dir, split)
    from fastmem.data.synthetic import make_synthetic

    if synthetic_size < 1:
        fail(f"synthetic: dataset size must be at least 1, got {synthetic_size}")
    n = synthetic_size if split == "train" else max(1000, synthetic_size // 5)
    return make_synthetic(n, size=image_size or 32, seed=seed, split=split)


def load_arrays(
    name: str,
    split: str = "train",
    data_dir: str | Path | None = None,
    *,
    synthetic_size: int = 5000,
    image_size: int | None = None,
    seed: int = 0,
    channels: int = 3,
) -> ArrayDataset:
    """Like load_dataset, but file datasets are decoded to image_size (default 64) uint8 NHWC arrays."""
    ds = load_dataset(name, split, data_dir, synthetic_size=synthetic_size, image_size=image_size, seed=seed)
    if isinstance(ds, ArrayDataset):
        return ds
    from fastmem.data.imagefolder import decode_files

    return decode_files(ds, image_size or DEFAULT_DECODE_SIZE, channels)
