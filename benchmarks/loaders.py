"""Loader throughput: every pipeline backend on the same full augmentation, side by side in one run.

Claim checked (DESIGN.md, issue 4): on CPU the `device` pipeline is ≥ 30× the torch DataLoader
baseline (2 workers) and ≥ 3× DALI CPU-only for the full augmentation (RandomResizedCrop, flip,
colour jitter in random order, grayscale). Measures images/s of whole epochs through
`fastmem.pipelines.make_loader` (and, as the baseline, a plain DataLoader with torchvision's own v2
transforms, the reference implementation's kind of loader) (order, parameters, pixels and targets: everything a trainer
receives, no model) at 32 px and 64 px, batch 256, and prints each backend's ratio to that baseline with 2 workers. Backends that are not installed are skipped with a note.

    python benchmarks/loaders.py                      # CPU: 32 and 64 px, all backends
    python benchmarks/loaders.py --device cuda        # GPU: device, DALI (GPU) and FFCV (ToDevice)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fastmem.pipelines import PIPELINE_NAMES, make_loader  # noqa: E402
from fastmem.pipelines.backends.torch import shutdown_workers  # noqa: E402
from machine import describe_machine, machine_label, results_tag  # noqa: E402

from fastmem.data.synthetic import make_synthetic  # noqa: E402
from fastmem.errors import FastmemError  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "torchvision v2 DataLoader (2 workers)"
# (row label, pipeline, workers): the baseline first; `workers` only matters to DataLoaders. The
# baseline is the reference implementation's kind of loader: torchvision's own per-sample v2
# transforms drawing their own randomness (not our sampler), in a plain DataLoader.
# Every registered pipeline gets a row (the torch DataLoader also with 2 workers, as the baseline).
BACKENDS = (
    (BASELINE, "torchvision-v2", 2),
    ("torch (2 workers)", "torch", 2),
    *((f"{name} (0 workers)" if name == "torch" else name, name, 0) for name in PIPELINE_NAMES),
)


class V2Views(torch.utils.data.Dataset):
    """uint8 NHWC array → torchvision v2 `full` views, one sample at a time (the reference style)."""

    def __init__(self, images: np.ndarray, targets: np.ndarray) -> None:
        from torchvision.transforms import v2

        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)
        self.targets = torch.from_numpy(np.asarray(targets, dtype=np.int64))
        size = images.shape[1]
        self.transform = v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), v2.RandomGrayscale(0.2),
            v2.ToDtype(torch.float32, scale=True),
        ])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.targets[i]


class V2Loader:
    """A DataLoader over `V2Views` with the contract's set_epoch/len, batches moved to `device`
    (channels_last, or NCHW as the reference implementation keeps them)."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, batch: int, device: torch.device, workers: int,
                 channels_last: bool = True) -> None:
        self.loader = torch.utils.data.DataLoader(V2Views(images, targets), batch_size=batch, shuffle=True,
                                                  drop_last=True, num_workers=workers, persistent_workers=workers > 0)
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, targets in self.loader:
            yield _V2Batch(images.to(self.device).contiguous(memory_format=self.memory_format), targets.to(self.device))

    def close(self) -> None:
        """End the DataLoader's worker processes, as the contract's loaders do (safe to call again)."""
        shutdown_workers(self.loader)


class _V2Batch:
    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.images, self.targets, self.indices = images, targets, targets


def measure(pipeline: str, workers: int, images: np.ndarray, targets: np.ndarray, batch: int, device: torch.device,
            seconds: float, warmup_batches: int) -> tuple[float, float]:
    """(images/s over whole timed epochs, build seconds); epochs are timed until `seconds` have passed."""
    started = time.perf_counter()
    if pipeline == "torchvision-v2":
        loader = V2Loader(images, targets, batch, device, workers)
    else:
        loader = make_loader(pipeline, images, targets, augment="full", batch_size=batch, device=device, seed=0,
                             workers=workers)
    build = time.perf_counter() - started
    for k, _ in enumerate(loader):  # compile, spawn, allocate: not timed
        if k + 1 >= warmup_batches:
            break
    count, epoch = 0, 1
    started = time.perf_counter()
    while True:
        loader.set_epoch(epoch)
        for views in loader:
            count += len(views.indices)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return count / elapsed, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="where the batches go (and DALI/device augment): cpu or cuda")
    parser.add_argument("--sizes", default="32,64", help="comma-separated image sizes (px)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size")
    parser.add_argument("--samples", type=int, default=5120, help="synthetic images per epoch")
    parser.add_argument("--seconds", type=float, default=4.0, help="minimum timed time per measurement (whole epochs)")
    parser.add_argument("--warmup-batches", type=int, default=3, help="untimed batches first (compilation, workers)")
    parser.add_argument("--repeats", type=int, default=2, help="measure each backend this often (interleaved); keep the best")
    parser.add_argument("--backends", default=",".join(label for label, _, _ in BACKENDS),
                        help="comma-separated row labels to run")
    args = parser.parse_args()
    device = torch.device(args.device)
    chosen = [b for b in BACKENDS if b[0] in {s.strip() for s in args.backends.split(",")}]
    machine = describe_machine(device)
    load_before = os.getloadavg()
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    for size in (int(s) for s in args.sizes.split(",")):
        data = make_synthetic(args.samples, size=size, seed=0)
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeats):  # interleaved, so a burst of load on a shared machine hits every backend
            for label, pipeline, workers in chosen:
                if label in skipped:
                    continue
                try:
                    rate, build = measure(pipeline, workers, data.images, data.labels, args.batch_size, device,
                                          args.seconds, args.warmup_batches)
                except FastmemError as err:  # not installed, or no such backend on this device
                    skipped[label] = str(err)
                    print(f"{size:>4} px  {label:<38} skipped: {err}", flush=True)
                    continue
                if rate > best.get(label, (0.0, 0.0))[0]:
                    best[label] = (rate, build)
        baseline = best.get(BASELINE, (float("nan"), 0.0))[0]
        for label, _, _ in chosen:
            if label in best:
                rate, build = best[label]
                rows.append({"size": size, "backend": label, "images_per_s": rate, "ratio_to_baseline": rate / baseline,
                             "build_s": build})
                print(f"{size:>4} px  {label:<38} {rate:10.0f} img/s  {rate / baseline:7.2f}x  (build {build:.1f} s)",
                      flush=True)
    load_after = os.getloadavg()
    print(f"machine: {machine_label(machine)}; full augmentation, batch {args.batch_size}, {args.samples} synthetic "
          f"images, best of {args.repeats}; torch threads {torch.get_num_threads()}; "
          f"load average {load_before[0]:.1f} → {load_after[0]:.1f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"loaders-{results_tag(machine)}.json"  # loaders-cpu.json, loaders-gpu-H100.json
    payload = {"benchmark": "loaders", "machine": machine, "augment": "full", "batch_size": args.batch_size,
               "samples": args.samples, "seconds": args.seconds, "repeats": args.repeats, "rows": rows,
               "skipped": skipped, "baseline": BASELINE, "load_average": [load_before[0], load_after[0]],
               "torch_threads": torch.get_num_threads(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
