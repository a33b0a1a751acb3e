"""The paper's run end to end: fastmem against the reference setup, and the projected wall time of 10,000 epochs.

Claim checked (DESIGN.md, issue 15): the headline run — CIFAR-10-sized data (50,000 × 32 × 32 × 3,
10 classes), random labels, the full augmentation set, ResNet-18 CIFAR + projector B = 65,536, MSE on
one-hot, Adam 3e-4, batch 256, the per-layer k-NN probe every 50 epochs, 10,000 epochs — takes ≤ 2 h
on one H100/H200 with fastmem, against "a few days" with the reference setup.

Both halves train the same model on the same CIFAR-shaped synthetic source (fastmem/data/synthetic.py)
for as many epochs as `--seconds` of training allow (cut mid-epoch when the cap falls there), after
untimed warm-up steps, and probe the untrained network and every `--probe-every` epochs on the way:
  - fastmem:   the `device` pipeline (dataset resident, whole-batch fused augmentation), channels_last,
               autocast (`--precision`, bf16 on a GPU), the trainer's optimizer and `train_step`, the
               probe of every layer (fastmem.probe: eval-mode embeddings, exact cosine k-NN kernels);
  - reference: a torchvision DataLoader applying the full set per sample with torchvision transforms
               (RandomResizedCrop, flip, ColorJitter p=0.8, RandomGrayscale; benchmarks/loaders.py's
               baseline), fp32 NCHW, torch.optim.Adam, the same `train_step`, and a k-NN of h only on
               the CPU (scikit-learn KNeighborsClassifier brute cosine, or plain numpy without it).
Per half it reports training images/s, seconds per epoch split into waiting for the next batch and
the step, seconds per probe, and the projection `epochs × s per epoch + (epochs // probe_every) × s
per probe` with each part's share; ratios are ours ÷ reference. The training step is timed as the
loop runs it (paper_run_loop.py says how loader time is measured without a sync per step).

    python benchmarks/paper_run.py                      # a GPU: the paper's sizes, 60 s of training per half
    python benchmarks/paper_run.py --device cpu --samples 2048 --model small_cnn --bottleneck-dim 1024 \\
        --probe-queries 500 --seconds 20                # a CPU-sized smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fastmem.pipelines import make_loader  # noqa: E402
from loaders import V2Loader  # noqa: E402
from machine import describe_machine, machine_label, results_tag  # noqa: E402
from paper_run_loop import HalfResult, HalfSetup, Probe, RunShape, StepFn, run_half  # noqa: E402

from fastmem.data.labels import make_targets  # noqa: E402
from fastmem.data.synthetic import make_synthetic  # noqa: E402
from fastmem.errors import fail, run_cli  # noqa: E402
from fastmem.models import MODEL_NAMES  # noqa: E402
from fastmem.probe import extract_embeddings, probe_predictions  # noqa: E402
from fastmem.run.config import TrainConfig  # noqa: E402
from fastmem.runtime import PRECISIONS, precision_name, resolve_device, resolve_precision, set_cpu_threads  # noqa: E402
from fastmem.train.build import build_optimizer  # noqa: E402
from fastmem.train.loop import compute_loss, train_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_KNN = ("auto", "sklearn", "numpy")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--device", default="auto", help="auto (cuda when available), cpu or cuda[:N]")
    add("--samples", type=int, default=50000, help="training images (CIFAR-10: 50,000)")
    add("--image-size", type=int, default=32, help="image side in pixels (CIFAR: 32)")
    add("--classes", type=int, default=10, help="classes of the synthetic source and of the random labels")
    add("--model", default="resnet18", choices=MODEL_NAMES, help="model (the paper: resnet18, the CIFAR stem)")
    add("--width", type=float, default=1.0, help="model width multiplier")
    add("--bottleneck-dim", type=int, default=65536, help="projector width B (the headline run: 65,536)")
    add("--batch-size", type=int, default=256, help="batch size (the paper: 256)")
    add("--precision", default="auto", choices=PRECISIONS, help="fastmem's autocast (auto: bf16 on a GPU; on a CPU "
        "bf16 only where measurably faster); the reference is fp32")
    add("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile fastmem's model")
    add("--cuda-graph", action=argparse.BooleanOptionalAction, default=False, help="fastmem's step captured in a "
        "CUDA graph and replayed (the trainer's --cuda-graph; CUDA only)")
    add("--seconds", type=float, default=60.0, help="training seconds per half (loader + step); probes come on top")
    add("--warmup-steps", type=int, default=0, help="untimed steps first (0 = 20 on a GPU, 40 with --compile, 2 on CPU)")
    add("--epochs", type=int, default=10000, help="epochs of the projected run (the paper: 10,000)")
    add("--probe-every", type=int, default=50, help="k-NN probe every E epochs (the paper: 50)")
    add("--probe-queries", type=int, default=10000, help="probe queries: synthetic test-split images (CIFAR: 10,000)")
    add("--probe-reference", type=int, default=0, help="probe reference: the first R training images, "
        "un-augmented, true labels (0 = all --samples)")
    add("--probe-project-dim", type=int, default=0, help="fastmem's probe: random-project layers wider than this "
        "(0 = exact, the trainer's default)")
    add("--k", type=int, default=20, help="k of the k-NN probe (the paper: 20)")
    add("--reference-workers", type=int, default=min(8, os.cpu_count() or 1),
        help="DataLoader workers of the reference (default: min(8, CPU cores), %(default)s here)")
    add("--reference-knn", default="auto", choices=REFERENCE_KNN, help="the reference's CPU k-NN of h: scikit-learn "
        "KNeighborsClassifier (brute, cosine), plain numpy brute force, or auto (scikit-learn where installed)")
    add("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    add("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(), help="progress bars on stderr")
    add("--out", type=Path, default=None, help="JSON path (default results/paper_run-<cpu|gpu-MODEL>.json)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Reject sizes that cannot make a run, before any work."""
    if args.batch_size < 1:
        fail(f"--batch-size must be positive, got {args.batch_size}")
    if args.samples < args.batch_size:
        fail(f"--samples must be at least --batch-size ({args.batch_size}): one whole batch, got {args.samples}")
    if args.image_size < 8 or args.classes < 2 or args.width <= 0 or args.bottleneck_dim < 0:
        fail("need --image-size >= 8, --classes >= 2, --width > 0 and --bottleneck-dim >= 0")
    if not args.seconds > 0 or args.epochs < 1 or args.probe_every < 1:
        fail("need --seconds > 0, --epochs >= 1 and --probe-every >= 1")
    if args.probe_queries < 1 or not 0 <= args.probe_reference <= args.samples:
        fail(f"need --probe-queries >= 1 and 0 <= --probe-reference <= --samples ({args.samples})")
    if not 1 <= args.k <= (args.probe_reference or args.samples):
        fail(f"--k must be in [1, probe reference size], got {args.k}")
    if min(args.warmup_steps, args.reference_workers, args.threads, args.probe_project_dim) < 0:
        fail("--warmup-steps, --reference-workers, --threads and --probe-project-dim must be >= 0")


def numpy_knn_predict(reference: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int, classes: int) -> np.ndarray:
    """Brute-force cosine k-NN, unweighted majority vote: blocks of queries against every reference row."""
    reference = reference / np.linalg.norm(reference, axis=1, keepdims=True).clip(1e-12)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-12)
    predicted = []
    for start in range(0, len(queries), 1024):
        similarity = queries[start:start + 1024] @ reference.T
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(nearest), classes), dtype=np.int64)
        np.add.at(votes, (np.arange(len(nearest))[:, None], labels[nearest]), 1)
        predicted.append(votes.argmax(axis=1))
    return np.concatenate(predicted)


def reference_probe(data: dict[str, Any], args: argparse.Namespace, device: torch.device) -> tuple[Probe, str]:
    """The reference code's probe: h in eval mode (fp32 NCHW), then a CPU k-NN; and its name."""
    use_sklearn = args.reference_knn == "sklearn"
    if args.reference_knn == "auto":
        try:
            import sklearn  # noqa: F401
            use_sklearn = True
        except ImportError:
            pass
    kind = ("scikit-learn KNeighborsClassifier (brute, cosine)" if use_sklearn
            else "numpy brute-force cosine k-NN" + (" (scikit-learn not installed)" if args.reference_knn == "auto" else ""))

    def probe(model: Any, rows: int) -> dict[str, float]:
        def embed(images: np.ndarray) -> np.ndarray:
            found = extract_embeddings(model, images, device=device, dtype=None, layers=("h",),
                                       batch_size=args.batch_size, channels_last=False)
            return found["h"].vectors.astype(np.float32)

        part = slice(0, rows or None)
        reference, labels = embed(data["reference_images"][part]), data["reference_labels"][part]
        queries, truth = embed(data["query_images"][part]), data["query_labels"][part]
        if use_sklearn:
            from sklearn.neighbors import KNeighborsClassifier

            knn = KNeighborsClassifier(n_neighbors=min(args.k, len(labels)), metric="cosine", algorithm="brute")
            predicted = knn.fit(reference, labels).predict(queries)
        else:
            predicted = numpy_knn_predict(reference, labels, queries, min(args.k, len(labels)), args.classes)
        return {"h": float(np.mean(predicted == truth))}

    return probe, kind


def fastmem_probe(data: dict[str, Any], args: argparse.Namespace, device: torch.device,
                  dtype: torch.dtype | None) -> Probe:
    """fastmem's in-training probe: every probe point, exact cosine k-NN on the device's kernels."""
    def probe(model: Any, rows: int) -> dict[str, float]:
        part = slice(0, rows or None)
        return dict(probe_predictions(model, data["reference_images"][part], data["reference_labels"][part],
                                      data["query_images"][part], data["query_labels"][part], device=device,
                                      dtype=dtype, k=args.k, num_classes=args.classes,
                                      project_dim=args.probe_project_dim).accuracy())

    return probe


def build_data(args: argparse.Namespace) -> dict[str, Any]:
    """CIFAR-shaped synthetic train/test splits, random labels (fixed for the run), the probe's sets."""
    train = make_synthetic(args.samples, size=args.image_size, num_classes=args.classes, seed=0, split="train")
    test = make_synthetic(args.probe_queries, size=args.image_size, num_classes=args.classes, seed=0, split="test")
    references = args.probe_reference or args.samples
    return {"images": train.images, "targets": make_targets(train.labels, args.classes, 1.0, 0).targets,
            "reference_images": train.images[:references], "reference_labels": train.labels[:references],
            "query_images": test.images, "query_labels": test.labels}


def fastmem_step(args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None) -> Callable[[Any], StepFn]:
    """The trainer's step for the paper's knobs: its optimizer (build.py), `train_step` or its CUDA-graph replay."""
    cfg = TrainConfig(model=args.model, batch_size=args.batch_size, compile=args.compile, cuda_graph=args.cuda_graph)

    def make(model: Any) -> StepFn:
        optimizer = build_optimizer(cfg, model, device)
        step_model = torch.compile(model) if args.compile else model
        if args.cuda_graph:
            from fastmem.train.cuda_graph import CudaGraphStep

            return CudaGraphStep(step_model, optimizer, functools.partial(compute_loss, "mse"), dtype)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        return functools.partial(train_step, step_model, optimizer, scaler, loss_kind="mse", device=device, dtype=dtype)

    return make


def reference_step(device: torch.device) -> Callable[[Any], StepFn]:
    """The reference code's step: torch.optim.Adam as it comes, fp32, the same `train_step`."""
    def make(model: Any) -> StepFn:
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        return functools.partial(train_step, model, optimizer, scaler, loss_kind="mse", device=device, dtype=None)

    return make


def setups(args: argparse.Namespace, data: dict[str, Any], device: torch.device,
           dtype: torch.dtype | None) -> list[HalfSetup]:
    """The two halves, ours (with autocast `dtype`) first."""
    ref_probe, ref_kind = reference_probe(data, args, device)
    execution = " + compile" * args.compile + " + CUDA graph" * args.cuda_graph
    ours = HalfSetup(
        "fastmem", f"device pipeline, {precision_name(dtype)} channels_last{execution}, probe of every layer "
        f"({'exact' if not args.probe_project_dim else f'projected to {args.probe_project_dim}'})",
        lambda: make_loader("device", data["images"], data["targets"], augment="full", batch_size=args.batch_size,
                            device=device, seed=0, channels_last=True, num_classes=args.classes),
        fastmem_step(args, device, dtype), True, fastmem_probe(data, args, device, dtype))
    reference = HalfSetup(
        "reference", f"torchvision DataLoader ({args.reference_workers} worker{'s' * (args.reference_workers != 1)}), fp32 NCHW, k-NN of h: {ref_kind}",
        lambda: V2Loader(data["images"], data["targets"], args.batch_size, device, args.reference_workers,
                         channels_last=False),
        reference_step(device), False, ref_probe)
    return [ours, reference]


def human(seconds: float) -> str:
    """12.3 s, 4.5 min, 6.7 h or 8.9 d."""
    for unit, size, limit in (("s", 1, 120), ("min", 60, 7200), ("h", 3600, 172800)):
        if seconds < limit:
            return f"{seconds / size:.3g} {unit}" if seconds < 10 else f"{seconds / size:.1f} {unit}"
    return f"{seconds / 86400:.1f} d"


def table(results: list[HalfResult], projections: list[dict[str, float]], epochs: int, probe_every: int) -> list[str]:
    """The side-by-side table: ours, the reference, and ours ÷ reference."""
    per = [r.per_epoch() for r in results]
    rows: list[tuple[str, list[str], float | None]] = [
        ("training images/s", [f"{r.images_per_s:,.0f}" for r in results],
         results[0].images_per_s / results[1].images_per_s),
        ("epochs measured", [f"{r.epochs:.2f}" for r in results], None),
        ("time per epoch", [human(p["epoch_s"]) for p in per], per[0]["epoch_s"] / per[1]["epoch_s"]),
        ("  waiting for the loader", [human(p["loader_s"]) for p in per],
         per[0]["loader_s"] / per[1]["loader_s"] if per[1]["loader_s"] > 0 else None),
        ("  training step", [human(p["step_s"]) for p in per], per[0]["step_s"] / per[1]["step_s"]),
        ("time per probe", [f"{human(p['probe_mean_s'])} (mean of {len(r.probe_s)})" for r, p in zip(results, projections)],
         projections[0]["probe_mean_s"] / projections[1]["probe_mean_s"]),
        ("probe points", [f"{len(r.accuracy)} layers" if len(r.accuracy) > 1 else ", ".join(r.accuracy) for r in results], None),
        (f"projected {epochs:,} epochs", [human(p["total_s"]) for p in projections],
         projections[0]["total_s"] / projections[1]["total_s"]),
        ("  share loader/step/probe", [" / ".join(f"{100 * p[f'{part}_share']:.0f}%" for part in ("loader", "step", "probe"))
                                      for p in projections], None),
    ]
    lines = [f"{'':<28} {'fastmem':>22} {'reference':>22} {'ours ÷ ref':>11}"]
    for label, values, ratio in rows:
        shown = f"{ratio:10.3g}×" if ratio is not None else ""
        lines.append(f"{label:<28} {values[0]:>22} {values[1]:>22} {shown:>11}")
    speedup = projections[1]["total_s"] / projections[0]["total_s"]
    lines.append(f"projection: epochs × time per epoch + {epochs // probe_every} probes (every {probe_every} epochs); "
                 f"fastmem {projections[0]['total_s'] / 3600:.2f} h vs reference {projections[1]['total_s'] / 3600:.2f} h "
                 f"= {speedup:.1f}× sooner")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    dtype = resolve_precision(args.precision, device)
    if args.cuda_graph:
        from fastmem.train.cuda_graph import check_cuda_graph

        check_cuda_graph(device, dtype, args.compile, "default", 1)
    if args.threads:
        set_cpu_threads(args.threads)
    machine = describe_machine(device)
    load_before = os.getloadavg()
    warmup = args.warmup_steps or (2 if not gpu else 40 if args.compile else 20)
    shape = RunShape(args.model, args.width, args.bottleneck_dim, args.classes, args.image_size, args.batch_size,
                     args.seconds, warmup, args.probe_every, args.progress)
    print(f"paper run on {machine_label(machine)}: {args.model} ×{args.width:g} + B={args.bottleneck_dim:,}, "
          f"{args.samples:,} × {args.image_size} px synthetic ({args.classes} classes), random labels, full augmentation, "
          f"batch {args.batch_size}, Adam 3e-4, MSE; probe {args.probe_queries:,} queries × "
          f"{args.probe_reference or args.samples:,} references, k={args.k}; {args.seconds:g} s of training per half "
          f"after {warmup} warm-up steps", flush=True)
    data = build_data(args)
    results: list[HalfResult] = []
    for setup in setups(args, data, device, dtype):
        print(f"{setup.name}: {setup.describe}", flush=True)
        results.append(run_half(shape, setup, device, lambda line: print(line, flush=True)))
        if gpu:
            torch.cuda.empty_cache()
    projections = [r.projection(args.epochs, args.probe_every) for r in results]
    load_after = os.getloadavg()
    for line in table(results, projections, args.epochs, args.probe_every):
        print(line)
    print(f"machine: {machine_label(machine)}; torch threads {torch.get_num_threads()}; "
          f"load average {load_before[0]:.1f} → {load_after[0]:.1f}")
    out = args.out or RESULTS / f"paper_run-{results_tag(machine)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    halves = {r.name: {"setup": r.describe, "steps": r.steps, "steps_per_epoch": r.steps_per_epoch, "epochs": r.epochs,
                       "train_s": r.train_s, "loader_s": r.loader_s, "step_s": r.step_s, "images_per_s": r.images_per_s,
                       "probe_s": r.probe_s, "probe_epochs": r.probe_epochs, "accuracy": r.accuracy,
                       "per_epoch": r.per_epoch(), "projection": p} for r, p in zip(results, projections)}
    payload = {"benchmark": "paper_run", "machine": machine, "options": {k: str(v) if isinstance(v, Path) else v
                                                                          for k, v in vars(args).items()},
               "warmup_steps": warmup, "halves": halves,
               "ratios": {"images_per_s": results[0].images_per_s / results[1].images_per_s,
                          "projected_total_s": projections[0]["total_s"] / projections[1]["total_s"]},
               "load_average": [load_before[0], load_after[0]], "torch_threads": torch.get_num_threads(),
               "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
