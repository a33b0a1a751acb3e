"""Probe extraction throughput: eager PyTorch against a torch-tensorrt engine (`--extract-backend trt`).

Measures images/s of `extract_embeddings` (every probe point, pooled, normalized, copied to the host as
float16) for ResNet-18 CIFAR (+ projector B) on synthetic 32 px images, eager in fp32 and under
bf16/fp16 autocast, and through TensorRT engines in fp16 and bf16 where torch-tensorrt and a GPU are
present (rows skipped with the reason otherwise); each engine's embeddings are compared with the
eager ones of the same precision (largest cosine distance) and its build time is reported.

    python benchmarks/extract.py --device cuda      # GPU: eager and TRT
    python benchmarks/extract.py                    # CPU: eager only (TRT needs a GPU)
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
from machine import describe_machine, machine_label, results_tag  # noqa: E402

from fastmem.data.synthetic import make_synthetic  # noqa: E402
from fastmem.models import create_model  # noqa: E402
from fastmem.probe.extract import extract_embeddings  # noqa: E402
from fastmem.probe.trt_extract import build_engine, trt_unavailable_reason  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def timed_extract(model, images: np.ndarray, device: torch.device, dtype: torch.dtype | None, batch: int,
                  forward=None, repeats: int = 2) -> tuple[float, dict]:
    """(best images/s over `repeats` passes after one warm-up pass, the embeddings)."""
    embeddings = extract_embeddings(model, images[:batch], device=device, dtype=dtype, batch_size=batch, forward=forward)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        embeddings = extract_embeddings(model, images, device=device, dtype=dtype, batch_size=batch, forward=forward)
        best = max(best, len(images) / (time.perf_counter() - started))
    return best, embeddings


def largest_cosine_distance(a: dict, b: dict) -> float:
    return max(float(1 - (a[k].vectors.astype(np.float32) * b[k].vectors.astype(np.float32)).sum(1).min()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--bottleneck-dim", type=int, default=4096, help="projector width B")
    parser.add_argument("--images", type=int, default=0, help="images embedded per pass (0 = 20,000 on GPU, 1,024 on CPU)")
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    count = args.images or (20000 if gpu else 1024)
    machine = describe_machine(device)
    load_before = os.getloadavg()
    images = make_synthetic(count, size=32, seed=0).images
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10, in_channels=3, image_size=32, bottleneck_dim=args.bottleneck_dim)
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    rows: list[dict] = []
    eager: dict[str, dict] = {}
    precisions = {"fp32": None, "bf16": torch.bfloat16, **({"fp16": torch.float16} if gpu else {})}
    for name, dtype in precisions.items():
        rate, eager[name] = timed_extract(model, images, device, dtype, args.batch_size)
        rows.append({"backend": "eager", "precision": name, "images_per_s": rate})
        print(f"eager {name:<5} {rate:12.0f} img/s", flush=True)
    skipped = trt_unavailable_reason(device)
    if skipped is None:
        for name in ("fp16", "bf16"):
            dtype = precisions[name]
            started = time.perf_counter()
            engine = build_engine(model, device, dtype, (3, 32, 32), args.batch_size)
            build = time.perf_counter() - started

            def forward(batch: torch.Tensor, engine=engine, dtype=dtype, names=model.probe_points):
                return dict(zip(names, engine(batch.to(dtype).contiguous())))

            rate, embedded = timed_extract(model, images, device, dtype, args.batch_size, forward=forward)
            distance = largest_cosine_distance(eager[name], embedded)
            rows.append({"backend": "trt", "precision": name, "images_per_s": rate, "build_s": build,
                         "ratio_to_eager": rate / next(r["images_per_s"] for r in rows if r["precision"] == name),
                         "largest_cosine_distance_to_eager": distance})
            print(f"trt   {name:<5} {rate:12.0f} img/s  ({rows[-1]['ratio_to_eager']:.2f}x eager {name}; build "
                  f"{build:.0f} s; largest cosine distance to eager {distance:.2e})", flush=True)
    else:
        print(f"trt: skipped ({skipped})")
    load_after = os.getloadavg()
    print(f"machine: {machine_label(machine)}; {args.model} + B={args.bottleneck_dim}, {count} images of 32 px, batch "
          f"{args.batch_size}, every probe point; load average {load_before[0]:.1f} → {load_after[0]:.1f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"extract-{results_tag(machine)}.json"
    payload = {"benchmark": "extract", "machine": machine, "model": args.model, "bottleneck_dim": args.bottleneck_dim,
               "images": count, "batch_size": args.batch_size, "rows": rows, "trt_skipped": skipped,
               "load_average": [load_before[0], load_after[0]], "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
