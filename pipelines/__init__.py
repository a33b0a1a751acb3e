"""Loader backends behind one contract (see `contract.py`); installed as `fastmem.pipelines`.

Owns `make_loader`, the drop-in entry point: it checks the pipeline against the registry
(registry.py: what each backend executes, its options), resolves the source (a uint8 NHWC array, an
`ArrayDataset`, a `FileDataset`, a dataset name, an image folder, or a file a backend option reads
such as an FFCV `.beton`), validates the options once, and builds the backend. Backends are
imported lazily, so an optional dependency (DALI, FFCV) is only needed when its backend is asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastmem.pipelines.contract import AUGMENT_NAMES, Batch, Loader, LoaderOptions
from fastmem.pipelines.params import AUGMENT_FORMS, AUGMENT_OPS, AugmentSpec
from fastmem.pipelines.registry import (
    BACKENDS,
    PIPELINE_NAMES,
    PipelineEntry,
    PipelineOption,
    check_backend_options,
    check_pipeline,
    load_factory,
    source_option,
)

from fastmem.data.iid_views import ViewPool, check_view_pool
from fastmem.errors import fail

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Source = np.ndarray | torch.Tensor | str | os.PathLike | Any  # Any: an ArrayDataset or FileDataset


def make_loader(
    pipeline: str,
    source: Source | None,
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
    **backend_options: Any,
) -> Loader:
    """A loader of augmented views over `source` (uint8 NHWC array, dataset, dataset name, image folder or .beton).

    `view_pool` (device and torch backends): each load of sample i shows one of its reserved images instead
    (i.i.d. views, see view_pool.py); targets, order and augmentation parameters stay sample i's.
    `backend_options`: the options the pipeline's registry entry declares (registry.py), e.g. ffcv's
    `beton=` (then `source` may be None) or dali's `image_size=` for image files.
    """
    spec = AugmentSpec.parse(augment)
    entry = check_pipeline(pipeline, spec, view_pool=view_pool is not None)
    options = check_backend_options(pipeline, backend_options)
    if dtype not in FLOAT_DTYPES:
        fail(f"dtype must be one of {', '.join(str(d) for d in FLOAT_DTYPES)}, got {dtype}")
    if workers < 0:
        fail(f"--workers must be >= 0, got {workers}")
    factory = load_factory(pipeline)
    images, targets, known_classes = _resolve_source(pipeline, entry, source, targets, options)
    loader_options = LoaderOptions(
        spec=spec, batch_size=batch_size, device=_device(device), seed=seed, label_seed=label_seed, shuffle=shuffle,
        drop_last=drop_last, rank=rank, world=world, workers=workers, channels_last=channels_last, dtype=dtype,
        num_classes=num_classes or known_classes,  # 0: the backend takes max(targets) + 1
    )
    if view_pool is None:
        return factory(images, targets, loader_options, **options)
    check_view_pool(view_pool, len(images), tuple(images.shape[1:]))
    return factory(images, targets, loader_options, view_pool=view_pool, **options)


def _device(device: str | torch.device) -> torch.device:
    """A torch.device, failing with one line when CUDA is asked for but absent."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        fail(f"bad device {device!r}: {err}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        fail(f"device {device!r} requested but CUDA is not available")
    return resolved


def _resolve_source(pipeline: str, entry: PipelineEntry, source: Source | None, targets: Any,
                    options: dict[str, Any]) -> tuple[Any, Any, int]:
    """(images, targets, number of classes or 0) from any accepted source, for this backend.

    Images are uint8 NHWC arrays, or a FileDataset for backends that decode files themselves, or None
    when a backend option (ffcv's `beton`) holds the data; `options` may gain that option.
    """
    from fastmem.data import DEFAULT_DECODE_SIZE, ArrayDataset, FileDataset, load_arrays
    from fastmem.data.imagefolder import decode_files, load_imagefolder

    known_classes = 0
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        readers = [n for n in BACKENDS if source_option(n, path.suffix)]
        if readers and not path.is_dir():  # a file a backend option reads (an FFCV .beton)
            name = source_option(pipeline, path.suffix)
            if name is None:
                fail(f"{path}: the {pipeline} pipeline reads no {path.suffix} file; the {' and '.join(readers)} "
                     "pipeline does")
            if name in options:
                fail(f"give the {path.suffix} file as the source or as {name}=, not both")
            options[name], source = str(path), None
        elif path.is_dir():
            source = load_imagefolder(path, "train")
        else:
            source = load_arrays(str(source), "train")
    if source is None:
        if not any(option.source_suffix and option.name in options for option in entry.options):
            fail("a source is required: a uint8 NHWC array, a dataset, a dataset name or a folder")
        return None, targets if targets is None else _targets(targets, None), 0
    if isinstance(source, FileDataset):
        targets = source.labels if targets is None else targets
        known_classes = source.num_classes
        if entry.file_lists:
            return source, _targets(targets, len(source)), known_classes
        source = decode_files(source, DEFAULT_DECODE_SIZE)  # as load_arrays decodes a file dataset
    if isinstance(source, ArrayDataset):
        targets = source.labels if targets is None else targets
        known_classes = source.num_classes
        source = source.images
    if not isinstance(source, (np.ndarray, torch.Tensor)):
        fail(f"source must be a uint8 NHWC array, a dataset, a dataset name or a folder, got {type(source).__name__}")
    uint8 = source.dtype == (torch.uint8 if isinstance(source, torch.Tensor) else np.uint8)
    if not uint8 or source.ndim != 4 or source.shape[3] not in (1, 3):
        fail(f"images must be uint8 NHWC with 1 or 3 channels, got {source.dtype} {tuple(source.shape)}")
    if targets is None:
        fail("targets are required when the source is an array")
    return source, _targets(targets, source.shape[0]), known_classes


def _targets(targets: Any, count: int | None) -> np.ndarray | torch.Tensor:
    """Targets as a tensor or int64 array, one per image (when `count` is known), non-negative."""
    targets = targets if isinstance(targets, torch.Tensor) else np.asarray(targets, dtype=np.int64)
    if count is not None and tuple(targets.shape) != (count,):
        fail(f"{len(targets)} targets for {count} images")
    if len(targets) and int(targets.min()) < 0:
        fail("targets must be non-negative class indices")
    return targets


__all__ = [
    "AUGMENT_FORMS", "AUGMENT_NAMES", "AUGMENT_OPS", "BACKENDS", "AugmentSpec", "Batch", "Loader", "LoaderOptions",
    "PIPELINE_NAMES", "PipelineEntry", "PipelineOption", "ViewPool", "check_pipeline", "make_loader",
]
