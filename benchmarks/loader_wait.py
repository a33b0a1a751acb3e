"""Is training ever starved? The share of a training step spent waiting on each pipeline.

Used by train_step.py. Trains a model for a few steps on batches from `make_loader` (the full
augmentation, synthetic images) and splits the wall time of each step into waiting for the next batch
(`next(loader)`, plus, on CUDA, the loader's kernels until a synchronize) and the step itself
(the trainer's `train_step`: forward, MSE, backward, Adam; then a synchronize). On CPU the loader and the model share the cores, so the
wait is the loader's whole cost; on a GPU it is what the loader fails to hide.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastmem.pipelines import make_loader

from fastmem.errors import FastmemError
from fastmem.models import create_model
from fastmem.train import train_step

# (row label, pipeline, DataLoader workers)
PIPELINES: tuple[tuple[str, str, int], ...] = (
    ("device", "device", 0),
    ("torch (2 workers)", "torch", 2),
    ("dali", "dali", 0),
    ("ffcv", "ffcv", 0),
)


@dataclass(frozen=True)
class LoaderWait:
    pipeline: str
    model: str
    images_per_s: float  # of the whole loop: loader + step
    wait_fraction: float  # share of the loop's wall time spent waiting for batches
    wait_ms_per_step: float
    step_ms: float


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_loader_wait(
    label: str, pipeline: str, workers: int, model_name: str, bottleneck: int, images: np.ndarray,
    targets: np.ndarray, batch: int, steps: int, warmup: int, device: torch.device, dtype: torch.dtype | None,
) -> LoaderWait:
    """Train `warmup` untimed then `steps` timed steps of `model_name` on `pipeline`'s batches."""
    torch.manual_seed(0)
    loader: Any = make_loader(pipeline, images, targets, augment="full", batch_size=batch, device=device, seed=0,
                              workers=workers, channels_last=True)
    model = create_model(model_name, num_classes=10, in_channels=images.shape[3], image_size=images.shape[1],
                         bottleneck_dim=bottleneck).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    epoch, batches = 0, iter(loader)
    waited = stepped = 0.0
    for index in range(warmup + steps):
        started = time.perf_counter()
        try:
            views = next(batches)
        except StopIteration:
            epoch += 1
            loader.set_epoch(epoch)
            batches = iter(loader)
            views = next(batches)
        _synchronize(device)
        ready = time.perf_counter()
        train_step(model, optimizer, scaler, views.images, views.targets, "mse", device, dtype)  # the trainer's step
        _synchronize(device)
        if index >= warmup:
            waited += ready - started
            stepped += time.perf_counter() - ready
    del batches
    total = waited + stepped
    return LoaderWait(label, model_name, batch * steps / total, waited / total, 1e3 * waited / steps,
                      1e3 * stepped / steps)


def loader_wait_rows(
    models: list[str], pipelines: list[str], batch: int, steps: int, warmup: int, device: torch.device,
    dtype: torch.dtype | None, image_size: int = 32,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Rows of every (model, installed pipeline); pipelines that cannot run here are returned with the reason."""
    from fastmem.data.synthetic import make_synthetic

    data = make_synthetic(max(2048, batch * (warmup + steps)), size=image_size, seed=0)
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for model_name in models:
        bottleneck = 65536 if model_name == "resnet18" else 4096
        for label, pipeline, workers in PIPELINES:
            if (label not in pipelines and pipeline not in pipelines) or label in skipped:
                continue
            try:
                result = measure_loader_wait(label, pipeline, workers, model_name, bottleneck, data.images,
                                             data.labels, batch, steps, warmup, device, dtype)
            except FastmemError as err:  # not installed, or not on this device
                skipped[label] = str(err)
                print(f"{model_name:>10} {label:<20} skipped: {err}", flush=True)
                continue
            rows.append({"model": model_name, "bottleneck_dim": bottleneck, "pipeline": label,
                         "images_per_s": result.images_per_s, "wait_fraction": result.wait_fraction,
                         "wait_ms_per_step": result.wait_ms_per_step, "step_ms": result.step_ms})
            print(f"{model_name:>10} {label:<20} {result.images_per_s:10.0f} img/s  waits {result.wait_fraction:6.1%} "
                  f"({result.wait_ms_per_step:.1f} ms of {result.wait_ms_per_step + result.step_ms:.1f} ms per step)",
                  flush=True)
    return rows, skipped
