"""The `dali` backend: an NVIDIA DALI pipeline that executes the shared sampler's view parameters.

Owns the DALI graph and its feeding. Each batch's indices, view ids, parameters and targets come
from backends/base.py, as for every other backend; the pixels (uint8 arrays, or the encoded bytes of
an image-file list: a FileDataset or an image folder given to make_loader, decoded to `image_size`)
and the parameters enter the graph through `external_source`, so DALI draws no randomness and its
views are the sampler's. CPU-only (`device_id=None`) without CUDA; on CUDA the augmentation runs on
the GPU and JPEGs decode with `decoders.image(device="mixed")`. It must not own the order or draw
parameters. The ops its graph executes are declared in registry.py (`DALI_OPS`), which refuses
every spec with another op before anything is built.

Graph: [decode + resize to S×S] → reflect pad (standard) → slice(crop box) → bilinear resize to S×S
(align_corners=False, no antialias) → ×1/255 → flip → colour (full): brightness_contrast with the
view's luma mean as the contrast pivot, then hsv (hue rotation, saturation; grayscale folded in as
saturation 0) → clamp to [0, 1].

Tolerances against the reference executor (executors/reference.py) on the same parameters
(checked in tests/pipelines/test_dali_loader.py):
- geometry (crop, resize, flip, reflect pad): identical up to float rounding (≤ 1e-5);
- grayscale: DALI's luma weights (0.299, 0.587, 0.114) vs torchvision's 0.2989: ≤ 1/255;
- one jitter op alone (brightness, contrast, saturation): ≤ 1/255;
- brightness + contrast + saturation together: DALI applies them in one fused op and clamps once
  at the end, whereas torchvision clamps after each op in the view's random order; they commute
  when nothing clips, so they differ only where a pixel clips mid-way: mean |Δ| ≤ 0.02;
- hue: DALI rotates chroma in YIQ space (a linear map), torchvision shifts H in HSV: the same
  shift in a different colour model, mean |Δ| ≤ 0.08 for the full ±0.2-turn range;
- the whole `full` set: mean |Δ| ≤ 0.06 (measured ≈ 0.04 on synthetic 32 px colour images);
- `strength:A` (RandAugment) is not executed by this backend (registry.py's check says so in one line).
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastmem.pipelines.backends.base import EpochLoader
from fastmem.pipelines.contract import Batch, LoaderOptions
from fastmem.pipelines.executors.reference import GRAY_WEIGHTS
from fastmem.pipelines.params import ViewParams
from fastmem.pipelines.registry import check_pipeline

from fastmem.data import DEFAULT_DECODE_SIZE
from fastmem.errors import fail

DALI_MISSING = "the dali pipeline needs NVIDIA DALI: pip install -e .[dali] (nvidia-dali-cuda120)"
PREFETCH = 2  # batches DALI computes ahead of the consumer


def import_dali() -> Any:
    """The `nvidia.dali` package (fn, types, math, Pipeline loaded), or a one-line FastmemError."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn
        import nvidia.dali.math
        import nvidia.dali.pipeline
        import nvidia.dali.types  # noqa: F401
    except ImportError as err:
        fail(f"{DALI_MISSING} ({err})")
    return dali


def dali_feeds(params: ViewParams, pad: int) -> dict[str, np.ndarray]:
    """The per-view arrays the graph's external sources read, from the sampler's parameters (vectorized)."""
    crop = params.crop.cpu()
    feeds = {
        "anchor": (crop[:, :2] + pad).to(torch.float32).numpy(),  # (top, left) in the padded image
        "shape": crop[:, 2:].to(torch.float32).numpy(),  # (height, width)
        "flip": params.flip.cpu().to(torch.int32).numpy(),
    }
    if _colour(params.ops):
        identity = params.factors.new_tensor([1.0, 1.0, 1.0, 0.0])
        factors = torch.where(params.jitter.unsqueeze(1), params.factors, identity).cpu()
        feeds["brightness"] = factors[:, 0].contiguous().numpy()
        feeds["contrast"] = factors[:, 1].contiguous().numpy()
        if params.channels == 3:
            keep = (~params.grayscale.cpu()).to(torch.float32)  # grayscale = saturation 0, after the jitter
            feeds["saturation"] = (factors[:, 2] * keep).numpy()
            feeds["hue"] = (factors[:, 3] * 360.0).numpy()  # fraction of a turn → degrees
    return feeds


def _reflect_pad(fn: Any, x: Any, pad: int, height: int, width: int) -> Any:
    """Mirror `pad` pixels on every side of an HWC image without repeating the edge (torch 'reflect')."""

    def strip(img: Any, start: list[int], shape: list[int], **flip: int) -> Any:
        return fn.flip(fn.slice(img, start=start, shape=shape, axis_names="HW"), **flip)

    top = strip(x, [1, 0], [pad, width], horizontal=0, vertical=1)
    bottom = strip(x, [height - 1 - pad, 0], [pad, width], horizontal=0, vertical=1)
    x = fn.cat(top, x, bottom, axis_name="H")
    left = strip(x, [0, 1], [height + 2 * pad, pad], horizontal=1)
    right = strip(x, [0, width - 1 - pad], [height + 2 * pad, pad], horizontal=1)
    return fn.cat(left, x, right, axis_name="W")


def _colour(ops: tuple[str, ...]) -> bool:
    """True when the views have a colour stage (jitter, and grayscale folded into its saturation)."""
    return "color_jitter" in ops or "grayscale" in ops


def _define_graph(dali: Any, ops: tuple[str, ...], size: tuple[int, int], channels: int, gpu: bool,
                  from_files: bool) -> Any:
    """The DALI graph of one batch of views with these ops (float HWC in [0, 1])."""
    fn, types = dali.fn, dali.types
    height, width = size
    if from_files:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, no_copy=False)
        decoded = fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                    output_type=types.RGB if channels == 3 else types.GRAY)
        images = fn.resize(decoded, size=[height, width], interp_type=types.INTERP_LINEAR, antialias=True)
    else:
        images = fn.external_source(name="images", layout="HWC", dtype=types.UINT8)
        images = images.gpu() if gpu else images
    if not ops:
        return fn.cast(images, dtype=types.FLOAT) * (1.0 / 255.0)
    pad = height // 8 if "pad_crop" in ops else 0
    if pad:
        images = _reflect_pad(fn, images, pad, height, width)
    anchor = fn.external_source(name="anchor", dtype=types.FLOAT)
    shape = fn.external_source(name="shape", dtype=types.FLOAT)
    flip = fn.external_source(name="flip", dtype=types.INT32)
    x = fn.slice(images, anchor, shape, axis_names="HW", normalized_anchor=False, normalized_shape=False)
    x = fn.resize(x, size=[height, width], interp_type=types.INTERP_LINEAR, antialias=False, dtype=types.FLOAT)
    x = fn.flip(x * (1.0 / 255.0), horizontal=flip)
    if not _colour(ops):
        return x
    brightness = fn.external_source(name="brightness", dtype=types.FLOAT)
    contrast = fn.external_source(name="contrast", dtype=types.FLOAT)
    means = fn.reductions.mean(x, axes=[0, 1])
    w = GRAY_WEIGHTS  # torchvision's luma for the pivot (DALI's hsv uses 0.299, 0.587, 0.114)
    pivot = means[0] if channels == 1 else means[0] * w[0] + means[1] * w[1] + means[2] * w[2]
    if gpu:  # argument inputs must live on the CPU, and the pivot is computed on the GPU
        b, c = brightness.gpu(), contrast.gpu()
        x = b * (c * x + (1.0 - c) * pivot)
    else:
        x = fn.brightness_contrast(x, brightness=brightness, contrast=contrast, contrast_center=pivot)
    if channels == 3:
        saturation = fn.external_source(name="saturation", dtype=types.FLOAT)
        hue = fn.external_source(name="hue", dtype=types.FLOAT)
        x = fn.hsv(x, hue=hue, saturation=saturation, dtype=types.FLOAT)
    return dali.math.clamp(x, 0.0, 1.0)


def _file_list(images: Any) -> tuple[str, ...] | None:
    """The file paths when `images` is a FileDataset or a sequence of paths, else None."""
    files = getattr(images, "files", None)
    if files is not None:
        return tuple(str(f) for f in files)
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], (str, Path)):
        return tuple(str(f) for f in images)
    return None


class DaliLoader(EpochLoader):
    """NVIDIA DALI backend: uint8 arrays or image files in, contract `Batch`es on `options.device` out."""

    def __init__(
        self,
        images: np.ndarray | torch.Tensor | Sequence[str] | Any,
        targets: np.ndarray | torch.Tensor,
        options: LoaderOptions,
        *,
        image_size: int = DEFAULT_DECODE_SIZE,
        channels: int = 3,
        num_threads: int = 0,
    ) -> None:
        """`images`: uint8 NHWC, or a FileDataset / list of image paths decoded to image_size² × channels."""
        check_pipeline("dali", options.spec)  # the ops this graph executes (registry.py), before DALI loads
        self.dali = import_dali()
        self.files = _file_list(images)
        if self.files is not None:
            if channels not in (1, 3) or image_size < 1:
                fail(f"dali: image files decode to size ≥ 1 and 1 or 3 channels, got {image_size}, {channels}")
            self.images, size, count = None, (image_size, image_size), len(self.files)
        else:
            array = images.cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
            if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] not in (1, 3):
                fail(f"dali: images must be uint8 NHWC with 1 or 3 channels, got {array.dtype} {array.shape}")
            self.images = np.ascontiguousarray(array)
            size, channels, count = (int(array.shape[1]), int(array.shape[2])), int(array.shape[3]), len(array)
        super().__init__(count, targets, options, size, channels)  # its own graph executes the views
        self.size = self.image_size
        self.pad = self.size[0] // 8 if "pad_crop" in self.spec.ops else 0
        self.gpu = options.device.type == "cuda"
        self._pending, self._generation = 0, 0
        self._threads = num_threads or options.workers or len(os.sched_getaffinity(0))
        self.pipe: Any = self._build(self._threads)

    def _pipeline(self) -> Any:
        """The DALI pipeline, built again if `close()` shut it down."""
        if self.pipe is None:
            self.pipe = self._build(self._threads)
        return self.pipe

    def close(self) -> None:
        """Shut the pipeline's threads down now, not whenever it is collected; safe to call again."""
        pipe, self.pipe = self.pipe, None
        if pipe is None:
            return
        self._generation += 1  # an epoch in flight is abandoned: its next batch says it is stale
        self._pending = 0  # its scheduled batches go with the pipeline
        shutdown = getattr(pipe, "_shutdown", None)  # what Pipeline.__del__ calls: DALI has no public close
        if callable(shutdown):
            shutdown()

    def _build(self, num_threads: int) -> Any:
        dali, o = self.dali, self.options
        device_id = (o.device.index if o.device.index is not None else torch.cuda.current_device()) if self.gpu else None
        pipe = dali.pipeline.Pipeline(batch_size=o.batch_size, num_threads=max(1, num_threads), device_id=device_id,
                                      prefetch_queue_depth=PREFETCH, exec_dynamic=True)
        with pipe:
            pipe.set_outputs(_define_graph(dali, self.spec.ops, self.size, self.channels, self.gpu, self.files is not None))
        pipe.build()
        # DALI's first run prefetches PREFETCH batches; run it once here so that every later
        # schedule_run computes exactly one fed batch and an epoch may be shorter than the queue.
        warmup = torch.arange(min(o.batch_size, self.num_samples))
        for _ in range(PREFETCH):
            self._feed(pipe, warmup, torch.zeros_like(warmup))
        self._run(pipe.schedule_run)
        for _ in range(PREFETCH):
            self._run(pipe.outputs)
        return pipe

    def execute(self, indices: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """Run the graph once on samples `indices` with the given parameters (of this loader's spec's ops)."""
        if params.ops != self.spec.ops or len(params) != len(indices):
            raise ValueError(f"params for {len(params)} {params.kind} views; this graph executes {self.spec.kind}")
        self._pipeline()
        self._drain()
        self._generation += 1  # any epoch in flight is abandoned
        self._feed(self.pipe, indices.cpu(), params=params)
        self._run(self.pipe.schedule_run)
        self._pending += 1
        (views,) = self._run(self.pipe.outputs)
        self._pending -= 1
        return self._to_torch(views, len(indices))

    def _feed(self, pipe: Any, indices: torch.Tensor, view_ids: torch.Tensor | None = None,
              params: ViewParams | None = None) -> None:
        """Hand one batch's pixels (or encoded files) and view parameters (drawn now unless given) to the graph."""
        if self.files is not None:
            pipe.feed_input("encoded", [self._read(i) for i in indices.tolist()])
        else:
            pipe.feed_input("images", self.images[indices.numpy()], layout="HWC")
        if self.spec.ops:
            if params is None:
                params = self.step.params(indices, view_ids)
            for name, values in dali_feeds(params, self.pad).items():
                pipe.feed_input(name, values)

    def _read(self, index: int) -> np.ndarray:
        try:
            return np.fromfile(self.files[index], dtype=np.uint8)
        except OSError as err:
            fail(f"{self.files[index]}: cannot read image ({err.strerror or err})")

    @staticmethod
    def _run(step: Any) -> Any:
        """Run a pipeline step; DALI's multi-line errors (a corrupt JPEG, say) become one line."""
        try:
            return step()
        except RuntimeError as err:
            text = str(err)
            op = re.search(r"operator `([^`]+)`", text)
            cause = text.split("encountered:", 1)[-1].strip().splitlines() or ["unknown error"]
            fail(f"dali: {op.group(1) + ' failed: ' if op else ''}{cause[0]}")

    def _drain(self) -> None:
        """Discard batches scheduled by an iteration that stopped early (they hold no state)."""
        while self._pending:
            self._pending -= 1
            self._run(self.pipe.outputs)

    def __iter__(self) -> Generator[Batch, None, None]:
        device = self.options.device
        self._pipeline()
        self._drain()
        self._generation += 1
        generation = self._generation
        batches = self.batch_indices("cpu")  # the graph is fed from the host
        view_ids = [self.view_ids(indices) for indices in batches]
        scheduled = 0
        try:
            while scheduled < min(PREFETCH, len(batches)):
                self._schedule(batches[scheduled], view_ids[scheduled])
                scheduled += 1
            for k, indices in enumerate(batches):
                if generation != self._generation:
                    raise RuntimeError("this epoch's iterator is stale: a newer iteration of the loader started")
                (views,) = self._run(self.pipe.outputs)
                self._pending -= 1
                images = self._to_torch(views, len(indices))
                if scheduled < len(batches):
                    self._schedule(batches[scheduled], view_ids[scheduled])
                    scheduled += 1
                indices, ids = indices.to(device), view_ids[k].to(device)
                yield Batch(images, self.step.targets_of(indices, ids), indices, ids)
        finally:
            if generation == self._generation:  # a stale iterator must not drain its successor's batches
                self._drain()

    def _schedule(self, indices: torch.Tensor, view_ids: torch.Tensor) -> None:
        self._feed(self.pipe, indices, view_ids)
        self._run(self.pipe.schedule_run)
        self._pending += 1

    def _to_torch(self, views: Any, count: int) -> torch.Tensor:
        """Copy DALI's HWC float batch into a new NCHW tensor on the target device, dtype and layout."""
        o = self.options
        nhwc = torch.empty((count, *self.size, self.channels), dtype=torch.float32,
                           device=o.device if self.gpu else "cpu")
        if self.gpu:
            stream = torch.cuda.current_stream(o.device).cuda_stream  # DALI copies on the consumer's stream
            views.copy_to_external(ctypes.c_void_p(nhwc.data_ptr()), stream, non_blocking=True)
        else:
            views.copy_to_external(ctypes.c_void_p(nhwc.data_ptr()))
        planar = nhwc.permute(0, 3, 1, 2)  # NCHW view with channels_last strides
        return planar.to(device=o.device, dtype=o.dtype, memory_format=o.memory_format)
