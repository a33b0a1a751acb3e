"""Training-step throughput: the reference setup (fp32, NCHW) against channels_last, autocast and compile.

Claim checked: ResNet-18 CIFAR (+ projector B = 65,536) trains ≥ 2.5× faster per step with
channels_last + bf16 than in fp32 NCHW on a GPU (DESIGN.md). Measures images/s of full training
steps (forward, MSE on one-hot, backward, Adam) on resident random inputs — the model alone, no
loader — for each configuration side by side in one run, and prints ratios to fp32 NCHW.

    python benchmarks/train_step.py                 # CPU-sized defaults
    python benchmarks/train_step.py --device cuda   # GPU: adds fp16 and torch.compile
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine, machine_label  # noqa: E402

from fastmem.models import create_model  # noqa: E402
from fastmem.runtime import autocast  # noqa: E402

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
    targets = F.one_hot(torch.randint(0, 10, (batch,), device=device), 10).float()

    def step() -> None:
        with autocast(device, dtype):
            output = step_model(images)
        loss = F.mse_loss(output.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

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
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch_size or (256 if gpu else 64)
    steps = args.steps or (50 if gpu else 5)
    with_compile = gpu if args.compile is None else args.compile
    machine = describe_machine(device)
    rows = []
    for model_name in args.models.split(","):
        bottleneck = 65536 if model_name == "resnet18" else 4096
        baseline = None
        for label, channels_last, dtype, compile_model in configurations(device, with_compile):
            rate = measure(model_name, bottleneck, batch, steps, 3 if not compile_model else 10, device,
                           channels_last, dtype, compile_model)
            baseline = baseline or rate
            rows.append({"model": model_name, "bottleneck_dim": bottleneck, "config": label,
                         "images_per_s": rate, "ratio_to_fp32_nchw": rate / baseline})
            print(f"{model_name:>10} B={bottleneck:<6} {label:<30} {rate:12.0f} img/s  {rate / baseline:5.2f}x", flush=True)
    print(f"machine: {machine_label(machine)}; batch {batch}, {steps} timed steps; inputs resident, no loader")
    RESULTS.mkdir(exist_ok=True)
    name = "train_step-" + ("gpu-" + machine["gpu"].split()[-1] if gpu else "cpu") + ".json"  # type: ignore[union-attr]
    payload = {"benchmark": "train_step", "machine": machine, "batch_size": batch, "steps": steps, "rows": rows,
               "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    (RESULTS / name.replace(" ", "_")).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
