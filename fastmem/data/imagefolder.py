"""ImageFolder trees (root/<split>/<class>/*.jpg|jpeg|png) as file lists, and decoding them to arrays.

Owns the tree layout rules (split directories train and val/test, or a root that directly holds
class directories for train; Tiny ImageNet's val/images + val_annotations.txt), class ordering
(sorted directory names, taken from train so both splits agree) and PIL decoding with resizing.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fastmem.data.types import ArrayDataset, FileDataset
from fastmem.errors import fail

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TEST_SPLIT_DIRS = ("val", "test")
TINY_VAL_ANNOTATIONS = "val_annotations.txt"


def _is_image(path: Path) -> bool:
    """A visible file with an image suffix (case-insensitive)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def _class_dirs(directory: Path) -> list[Path]:
    """Visible subdirectories, sorted by name."""
    return sorted((d for d in directory.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _images_under(directory: Path) -> list[Path]:
    """All image files below `directory` (any depth), sorted by path."""
    return sorted(p for p in directory.rglob("*") if _is_image(p))


def _split_dir(root: Path, split: str) -> Path:
    """The directory holding `split`'s class folders."""
    if split == "train":
        if (root / "train").is_dir():
            return root / "train"
        if any(d.name not in TEST_SPLIT_DIRS for d in _class_dirs(root)):
            return root
        fail(f"{root}: no train/ directory and no class directories in this ImageFolder root")
    for name in TEST_SPLIT_DIRS:
        if (root / name).is_dir():
            return root / name
    fail(f"{root}: no val/ or test/ directory for the test split of this ImageFolder root")


def _tiny_imagenet_val(split_dir: Path, class_names: tuple[str, ...]) -> tuple[list[str], list[int]]:
    """Files and labels of a Tiny-ImageNet-style val/ (images/ + val_annotations.txt)."""
    annotations = split_dir / TINY_VAL_ANNOTATIONS
    index = {name: i for i, name in enumerate(class_names)}
    files: list[str] = []
    labels: list[int] = []
    try:
        text = annotations.read_bytes().decode("utf-8")
    except OSError as err:
        fail(f"{annotations}: cannot read it ({err.strerror or err})")
    except UnicodeDecodeError as err:
        fail(f"{annotations}: not UTF-8 text (byte {err.start}); not a Tiny-ImageNet annotation file")
    for line_no, line in enumerate(text.splitlines(), 1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in index:
            fail(f"{annotations}:{line_no}: expected '<file>\\t<class in train/>', got {line[:80]!r}")
        name = fields[0]
        if not name or "\0" in name or Path(name).is_absolute() or ".." in Path(name).parts:
            fail(f"{annotations}:{line_no}: {name[:80]!r} is not a file name inside {split_dir / 'images'}")
        path = split_dir / "images" / name
        if not path.is_file():
            fail(f"{path}: listed in {annotations} but missing")
        files.append(str(path))
        labels.append(index[fields[1]])
    if not files:
        fail(f"{annotations}: lists no images (empty or truncated)")
    return files, labels


def load_imagefolder(root: str | Path, split: str = "train") -> FileDataset:
    """List an ImageFolder split ('train', or 'test' = val/ or test/) as files with labels."""
    root = Path(root)
    if not root.is_dir():
        fail(f"{root}: ImageFolder root is not a directory")
    if split not in ("train", "test"):
        fail(f"imagefolder: unknown split {split!r} (expected 'train' or 'test')")
    split_dir = _split_dir(root, split)
    has_train = (root / "train").is_dir() or any(d.name not in TEST_SPLIT_DIRS for d in _class_dirs(root))
    train_dir = _split_dir(root, "train") if split == "test" and has_train else split_dir
    class_dirs = [d for d in _class_dirs(train_dir) if not (train_dir == root and d.name in TEST_SPLIT_DIRS)]
    class_names = tuple(d.name for d in class_dirs)
    if not class_names:
        fail(f"{train_dir}: no class directories in this ImageFolder tree")
    if split == "test" and (split_dir / TINY_VAL_ANNOTATIONS).is_file():
        files, labels = _tiny_imagenet_val(split_dir, class_names)
    else:
        index = {name: i for i, name in enumerate(class_names)}
        files, labels = [], []
        for class_dir in _class_dirs(split_dir):
            if split_dir == root and class_dir.name in TEST_SPLIT_DIRS:
                continue
            if class_dir.name not in index:
                fail(f"{class_dir}: class directory not present in {train_dir}")
            found = _images_under(class_dir)
            files.extend(str(p) for p in found)
            labels.extend([index[class_dir.name]] * len(found))
    if not files:
        fail(f"{split_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in this ImageFolder split")
    name = f"imagefolder:{root.name}:{split}"
    return FileDataset(tuple(files), np.asarray(labels, dtype=np.int64), class_names, name)


def decode_image(path: str, size: int, channels: int = 3) -> np.ndarray:
    """Decode one image with PIL to uint8 size×size×channels (bilinear resize when needed)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB" if channels == 3 else "L")
            if image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        fail(f"{path}: cannot decode image ({' '.join(str(err).split())[:160]})")
    except Exception as err:  # noqa: BLE001 - PIL's decoders raise other types on damaged files (struct.error, ...)
        fail(f"{path}: cannot decode image ({type(err).__name__}: {' '.join(str(err).split())[:160]})")
    return array.reshape(size, size, channels)


def decode_files(ds: FileDataset, size: int, channels: int = 3, workers: int | None = None) -> ArrayDataset:
    """Decode every file of a FileDataset into a uint8 NHWC ArrayDataset of size×size×channels."""
    if channels not in (1, 3):
        fail(f"{ds.name}: channels must be 1 or 3, got {channels}")
    if size <= 0:
        fail(f"{ds.name}: image size must be positive, got {size}")
    images = np.empty((len(ds), size, size, channels), dtype=np.uint8)
    workers = workers or min(8, os.cpu_count() or 1)

    def decode_into(i: int) -> None:
        images[i] = decode_image(ds.files[i], size, channels)

    if workers <= 1 or len(ds) < 64:
        for i in range(len(ds)):
            decode_into(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(decode_into, range(len(ds))):  # re-raises the first failure in file order
                pass
    return ArrayDataset(images, ds.labels.copy(), ds.class_names, ds.name)
