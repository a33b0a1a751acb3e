"""Images for `probe_model` from what a user has: uint8 NHWC arrays, or a map-style dataset of (image, label).

Extraction takes uint8 NHWC (it scales to [0, 1] itself). A dataset item's image may be a PIL image, an
(H, W[, C]) numpy array (uint8, or float in [0, 1]) or a (C, H, W) tensor (uint8, or float in [0, 1], as
torchvision's ToTensor gives); its label an int or a 0-d tensor. Float images are rounded to uint8
(1/255 steps). Normalised floats (below 0 or above 1, e.g. after transforms.Normalize) are refused in one
line: the probe normalises inside the model wrapper instead (`mean`/`std`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fastmem.errors import fail


def _image_array(image: Any, index: int, what: str) -> np.ndarray:
    """One image as uint8 HWC."""
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu().numpy()
        if array.ndim == 3:
            array = array.transpose(1, 2, 0)  # CHW → HWC
    elif hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        array = np.asarray(image)
    else:
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        fail(f"{what}[{index}]: an image must be 2-D or 3-D, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (array.min() < 0 or array.max() > 1):
            fail(f"{what}[{index}]: float images must lie in [0, 1] (found {array.min():.3g}..{array.max():.3g}); "
                 "drop Normalize from the transform and pass mean/std to probe_model")
        return np.rint(array * 255).astype(np.uint8)
    fail(f"{what}[{index}]: images must be uint8 or float in [0, 1], got dtype {array.dtype}")


def as_uint8_nhwc(images: Any, labels: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC images, int64 labels) from an array (with `labels`) or a map-style dataset of (image, label)."""
    if isinstance(images, np.ndarray | torch.Tensor):
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
        if array.ndim == 3:
            array = array[..., None]
        if array.ndim != 4 or array.dtype != np.uint8:
            fail(f"{what}: arrays must be uint8 NHWC (or NHW), got {array.dtype} of shape {array.shape}")
        if labels is None:
            fail(f"{what}: give the labels with an image array")
        found = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    else:
        if not hasattr(images, "__getitem__") or not hasattr(images, "__len__"):
            fail(f"{what}: give uint8 NHWC images or a map-style dataset of (image, label), got {type(images).__name__}")
        rows, targets = [], []
        for index in range(len(images)):
            item = images[index]
            if not isinstance(item, tuple | list) or len(item) < 2:
                fail(f"{what}[{index}]: a dataset item must be (image, label), got {type(item).__name__}")
            rows.append(_image_array(item[0], index, what))
            targets.append(int(item[1]))
        if not rows:
            fail(f"{what}: the dataset is empty")
        shapes = {row.shape for row in rows}
        if len(shapes) > 1:
            fail(f"{what}: images of different shapes {sorted(shapes)[:3]}; resize them in the dataset's transform")
        array = np.stack(rows)
        found = np.asarray(targets) if labels is None else np.asarray(labels)
    if found.shape != (array.shape[0],) or not np.issubdtype(found.dtype, np.integer):
        fail(f"{what}: need one integer label per image, got {found.dtype} of shape {found.shape} "
             f"for {array.shape[0]} images")
    if len(found) and found.min() < 0:
        fail(f"{what}: labels must be non-negative, found {int(found.min())}")
    return np.ascontiguousarray(array), found.astype(np.int64)
