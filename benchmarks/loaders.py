"""Loader throughput: every pipeline backend on the same full augmentation, side by side in one run.

Claim checked (DESIGN.md, issue 4): on CPU the `device` pipeline is ≥ 30× the torch DataLoader
baseline (2 workers) and ≥ 3× DALI CPU-only for the full augmentation (RandomResizedCrop, flip,
colour jitter in random order, grayscale). Measures images/s of whole epochs through
`fastmem.pipelines.make_loader` (order, parameters, pixels and targets: everything a trainer
receives, no model) at 32 px and 64 px, batch 256, and prints each backend's ratio to the torch
DataLoader with 2 workers. Backends that are not installed are skipped with a note.

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
from fastmem.pipelines import make_loader  # noqa: E402
from machine import describe_machine, machine_label  # noqa: E402

from fastmem.data.synthetic import make_synthetic  # noqa: E402
from fastmem.errors import FastmemError  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "torch (2 workers)"
# (row label, pipeline, workers): the baseline first; `workers` only matters to the torch backend.
BACKENDS = (
    (BASELINE, "torch", 2),
    ("torch (0 workers)", "torch", 0),
    ("device", "device", 0),
    ("dali", "dali", 0),
    ("ffcv", "ffcv", 0),
)


def measure(pipeline: str, workers: int, images: np.ndarray, targets: np.ndarray, batch: int, device: torch.device,
            seconds: float, warmup_batches: int) -> tuple[float, float]:
    """(images/s over whole timed epochs, build seconds); epochs are timed until `seconds` have passed."""
    started = time.perf_counter()
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
                    print(f"{size:>4} px  {label:<20} skipped: {err}", flush=True)
                    continue
                if rate > best.get(label, (0.0, 0.0))[0]:
                    best[label] = (rate, build)
        baseline = best.get(BASELINE, (float("nan"), 0.0))[0]
        for label, _, _ in chosen:
            if label in best:
                rate, build = best[label]
                rows.append({"size": size, "backend": label, "images_per_s": rate, "ratio_to_torch_2_workers": rate / baseline,
                             "build_s": build})
                print(f"{size:>4} px  {label:<20} {rate:10.0f} img/s  {rate / baseline:7.2f}x  (build {build:.1f} s)",
                      flush=True)
    load_after = os.getloadavg()
    print(f"machine: {machine_label(machine)}; full augmentation, batch {args.batch_size}, {args.samples} synthetic "
          f"images, best of {args.repeats}; torch threads {torch.get_num_threads()}; "
          f"load average {load_before[0]:.1f} → {load_after[0]:.1f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"loaders-{'gpu-' + str(machine['gpu']).split()[-1] if device.type == 'cuda' else 'cpu'}.json"
    payload = {"benchmark": "loaders", "machine": machine, "augment": "full", "batch_size": args.batch_size,
               "samples": args.samples, "seconds": args.seconds, "repeats": args.repeats, "rows": rows,
               "skipped": skipped, "baseline": BASELINE, "load_average": [load_before[0], load_after[0]],
               "torch_threads": torch.get_num_threads(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
