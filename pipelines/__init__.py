"""Loader backends behind one contract (see `contract.py`); installed as `fastmem.pipelines`.

Owns the backend registry and `make_loader`, the drop-in entry point: it resolves the source (a
uint8 NHWC array, an `ArrayDataset`, a dataset name or an image-folder path), validates the
options once, and builds the backend. Backends are imported lazily, so an optional dependency
(DALI, FFCV) is only needed when its backend is asked for.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from fastmem.pipelines.contract import AUGMENT_NAMES, Batch, Loader, LoaderOptions
from fastmem.pipelines.params import AUGMENT_FORMS, AugmentSpec
from fastmem.pipelines.view_pool import check_view_pool_pipeline

from fastmem.data.iid_views import ViewPool, check_view_pool
from fastmem.errors import fail


class _Backend(NamedTuple):
    module: str  # imported on first use
    factory: str  # class or function taking (images, targets, options)
    extra: str = ""  # `pip install -e .[extra]` when an optional dependency is missing


# The registry: one line per backend, name → (module, factory, extra naming its optional dependency).
_BACKENDS: dict[str, _Backend] = {
    "device": _Backend("fastmem.pipelines.backends.device", "DeviceLoader"),
    "torch": _Backend("fastmem.pipelines.backends.torch", "TorchLoader"),
    # dali, ffcv: optional dependencies, imported by their loaders (one-line error naming the extra).
    "dali": _Backend("fastmem.pipelines.backends.dali", "DaliLoader", extra="dali"),
    "ffcv": _Backend("fastmem.pipelines.backends.ffcv", "FfcvLoader", extra="ffcv"),
}
PIPELINE_NAMES: tuple[str, ...] = tuple(_BACKENDS)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make_loader(
    pipeline: str,
    source: np.ndarray | torch.Tensor | str | os.PathLike,
    targets: np.ndarray | torch.Tensor | None = None,
    *,
    augment: str | AugmentSpec = "full",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    label_seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    channels_last: bool = True,
    dtype: torch.dtype = torch.float32,
    num_classes: int | None = None,
    view_pool: ViewPool | None = None,
) -> Loader:
    """A loader of augmented views over `source` (uint8 NHWC array, ArrayDataset, dataset name or image folder).

    `view_pool` (device and torch backends): each load of sample i shows one of its reserved images instead
    (i.i.d. views, see view_pool.py); targets, order and augmentation parameters stay sample i's.
    """
    if view_pool is not None:
        check_view_pool_pipeline(pipeline)
    factory = _backend(pipeline)
    spec = AugmentSpec.parse(augment)
    images, targets, known_classes = _resolve_source(source, targets)
    if dtype not in FLOAT_DTYPES:
        fail(f"dtype must be one of {', '.join(str(d) for d in FLOAT_DTYPES)}, got {dtype}")
    if workers < 0:
        fail(f"--workers must be >= 0, got {workers}")
    options = LoaderOptions(
        spec=spec, batch_size=batch_size, device=_device(device), seed=seed, label_seed=label_seed, shuffle=shuffle,
        drop_last=drop_last, rank=rank, world=world, workers=workers, channels_last=channels_last, dtype=dtype,
        num_classes=num_classes or known_classes or int(targets.max()) + 1,
    )
    if view_pool is None:
        return factory(images, targets, options)
    check_view_pool(view_pool, len(images), tuple(images.shape[1:]))
    return factory(images, targets, options, view_pool=view_pool)


def _backend(pipeline: str):
    """The factory of a registered backend, importing its module (and optional dependency) now."""
    if pipeline not in _BACKENDS:
        fail(f"unknown pipeline {pipeline!r}; available: {', '.join(PIPELINE_NAMES)}")
    entry = _BACKENDS[pipeline]
    try:
        module = importlib.import_module(entry.module)
    except ImportError as err:
        missing = getattr(err, "name", None) or str(err)
        if missing == entry.module:
            fail(f"pipeline {pipeline!r} is not part of this install ({entry.module} is missing)")
        hint = f"pip install -e .[{entry.extra}]" if entry.extra else "reinstall fastmem"
        fail(f"pipeline {pipeline!r} needs {missing!r}, which is not installed: {hint}")
    return getattr(module, entry.factory)


def _device(device: str | torch.device) -> torch.device:
    """A torch.device, failing with one line when CUDA is asked for but absent."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        fail(f"bad device {device!r}: {err}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        fail(f"device {device!r} requested but CUDA is not available")
    return resolved


def _resolve_source(source, targets) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor, int]:
    """(uint8 NHWC images, int64 targets, number of classes or 0) from any accepted source."""
    from fastmem.data import ArrayDataset, load_arrays

    known_classes = 0
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        source = load_arrays("imagefolder", "train", path) if path.is_dir() else load_arrays(str(source), "train")
    if isinstance(source, ArrayDataset):
        targets = source.labels if targets is None else targets
        known_classes = source.num_classes
        source = source.images
    if not isinstance(source, (np.ndarray, torch.Tensor)):
        fail(f"source must be a uint8 NHWC array, an ArrayDataset, a dataset name or a folder, got {type(source).__name__}")
    uint8 = source.dtype == (torch.uint8 if isinstance(source, torch.Tensor) else np.uint8)
    if not uint8 or source.ndim != 4 or source.shape[3] not in (1, 3):
        fail(f"images must be uint8 NHWC with 1 or 3 channels, got {source.dtype} {tuple(source.shape)}")
    if targets is None:
        fail("targets are required when the source is an array")
    targets = targets if isinstance(targets, torch.Tensor) else np.asarray(targets, dtype=np.int64)
    if tuple(targets.shape) != (source.shape[0],):
        fail(f"{len(targets)} targets for {source.shape[0]} images")
    if len(targets) and int(targets.min()) < 0:
        fail("targets must be non-negative class indices")
    return source, targets, known_classes


__all__ = [
    "AUGMENT_FORMS", "AUGMENT_NAMES", "AugmentSpec", "Batch", "Loader", "LoaderOptions", "PIPELINE_NAMES",
    "ViewPool", "make_loader",
]
