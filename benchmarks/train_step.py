"""Training-step throughput: the reference setup (fp32, NCHW) against channels_last, autocast and compile.

Claim checked: ResNet-18 CIFAR (+ projector B = 65,536) trains ≥ 2.5× faster per step with
channels_last + bf16 than in fp32 NCHW on a GPU (DESIGN.md). Measures images/s of full training
steps (the trainer's `train_step`: forward, MSE on one-hot, backward, Adam) on resident random inputs — the model alone, no
loader — for each configuration side by side in one run, and prints ratios to fp32 NCHW. Then, for
each pipeline installed (device, torch, dali, ffcv), the share of the training loop spent waiting for
the next batch of the full augmentation (loader_wait.py): is training ever starved?

    python benchmarks/train_step.py                 # CPU-sized defaults → results/train_step-cpu.json
    python benchmarks/train_step.py --device cuda   # GPU: adds fp16 and torch.compile → train_step-gpu-<GPU>.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader_wait import PIPELINES, loader_wait_rows  # noqa: E402
from machine import describe_machine, machine_label, results_tag  # noqa: E402

from fastmem.models import create_model  # noqa: E402
from fastmem.runtime import set_cpu_threads  # noqa: E402
from fastmem.train import train_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def configurations(device: torch.device, with_compile: bool) -> list[tuple[str, bool, torch.dtype | None, bool]]:
    """(label, channels_last, autocast dtype, compile) in the order they are reported."""
    configs = [("fp32 NCHW (reference)", False, None, False), ("fp32 channels_last", True, None, False),
               ("bf16 channels_last", True, torch.bfloat16, False)]
    if device.type == "cuda":
        configs.append(("fp16 channels_last", True, torch.float16, False))
    if with_compile:
        configs.append(("bf16 channels_last + compile", True, torch.bfloat16, True))
    return configs


def measure(model_name: str, bottleneck: int, batch: int, steps: int, warmup: int, device: torch.device,
            channels_last: bool, dtype: torch.dtype | None, compile_model: bool) -> float:
    """Images/s of `steps` timed training steps after `warmup` untimed ones."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, in_channels=3, image_size=32, bottleneck_dim=bottleneck).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step_model = torch.compile(model) if compile_model else model
    images = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    targets = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        train_step(step_model, optimizer, scaler, images, targets, "mse", device, dtype)  # the trainer's own step

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="small_cnn,resnet18", help="comma-separated model names")
    parser.add_argument("--batch-size", type=int, default=0, help="0 = 256 on GPU, 64 on CPU")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (0 = 50 on GPU, 5 on CPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="include torch.compile (default: on GPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=0, help="measure every configuration this often, interleaved, "
                        "and keep the best (0 = 1 on GPU, 2 on CPU: a shared CPU's load shifts between configurations)")
    parser.add_argument("--pipelines", default=",".join(p for _, p, _ in PIPELINES),
                        help="pipelines whose loader wait is measured (empty = none)")
    parser.add_argument("--loader-models", default="", help="models of the loader-wait rows (default: small_cnn on "
                        "CPU, small_cnn,resnet18 on GPU)")
    parser.add_argument("--loader-steps", type=int, default=0, help="timed steps per pipeline (0 = 16 on CPU, 50 on GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.threads:
        set_cpu_threads(args.threads)
    batch = args.batch_size or (256 if gpu else 64)
    steps = args.steps or (50 if gpu else 5)
    with_compile = gpu if args.compile is None else args.compile
    machine = describe_machine(device)
    load_before = os.getloadavg()
    repeats = args.repeats or (1 if gpu else 2)
    models = args.models.split(",")
    best: dict[tuple[str, str], float] = {}
    for _ in range(repeats):  # interleaved: a burst of load on a shared machine hits every configuration
        for model_name in models:
            bottleneck = 65536 if model_name == "resnet18" else 4096
            for label, channels_last, dtype, compile_model in configurations(device, with_compile):
                rate = measure(model_name, bottleneck, batch, steps, 3 if not compile_model else 10, device,
                               channels_last, dtype, compile_model)
                best[model_name, label] = max(rate, best.get((model_name, label), 0.0))
    rows = []
    for model_name in models:
        bottleneck = 65536 if model_name == "resnet18" else 4096
        baseline = None
        for label, *_ in configurations(device, with_compile):
            rate = best[model_name, label]
            baseline = baseline or rate
            rows.append({"model": model_name, "bottleneck_dim": bottleneck, "config": label,
                         "images_per_s": rate, "ratio_to_fp32_nchw": rate / baseline})
            print(f"{model_name:>10} B={bottleneck:<6} {label:<30} {rate:12.0f} img/s  {rate / baseline:5.2f}x", flush=True)
    print(f"machine: {machine_label(machine)}; batch {batch}, {steps} timed steps, best of {repeats}; inputs "
          f"resident, no loader; load average {load_before[0]:.1f} → {os.getloadavg()[0]:.1f}")
    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    loader_models = [m for m in (args.loader_models or ("small_cnn,resnet18" if gpu else "small_cnn")).split(",") if m]
    loader_steps = args.loader_steps or (50 if gpu else 16)
    loader_dtype = torch.bfloat16 if gpu else None  # the trainer's `auto` precision
    loader_rows, skipped = loader_wait_rows(loader_models, pipelines, batch, loader_steps, 8, device,
                                            loader_dtype) if pipelines else ([], {})
    load_after = os.getloadavg()
    print(f"loader wait: full augmentation, 32 px synthetic images, batch {batch}, {loader_steps} timed steps, "
          f"channels_last, {'bf16' if gpu else 'fp32'}; load average {load_before[0]:.1f} → {load_after[0]:.1f}, "
          f"torch threads {torch.get_num_threads()}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"train_step-{results_tag(machine)}.json"
    payload = {"benchmark": "train_step", "machine": machine, "batch_size": batch, "steps": steps, "repeats": repeats,
               "rows": rows, "loader_wait": {"rows": loader_rows, "skipped": skipped, "steps": loader_steps, "augment": "full",
                               "image_size": 32, "precision": "bf16" if gpu else "fp32"},
               "load_average": [load_before[0], load_after[0]], "torch_threads": torch.get_num_threads(),
               "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
