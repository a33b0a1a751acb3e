"""Training-step throughput: the reference setup (fp32 NCHW, plain Adam) against each change of the fast path.

Claim checked: ResNet-18 CIFAR + projector B = 65,536 trains at ≥ 70k img/s and ≥ 2.5× fp32 NCHW per step at
batch 256 on an H100/H200 (DESIGN.md, issue 15). Measures images/s of full training steps (the trainer's own:
forward, MSE on one-hot, backward, Adam 3e-4) on resident random inputs — the model alone, no loader — for
each configuration side by side in one run. Each row adds one change to the row it builds on and states its
ratio to fp32 NCHW and its gain over that row: channels_last, bf16 autocast, fused Adam (build.py's
`adam_flags`), torch.compile in each --compile-modes mode, the CUDA-graph step (fastmem/train/cuda_graph.py),
and compile + CUDA graph. Rows that need CUDA are skipped on a CPU with a note. Then, for each pipeline
installed (device, torch, dali, ffcv), the share of the training loop spent waiting for the next batch of the
full augmentation (loader_wait.py): is training ever starved?

    python benchmarks/train_step.py                 # CPU-sized defaults → results/train_step-cpu.json
    python benchmarks/train_step.py --device cuda   # every row → train_step-gpu-<GPU>.json
    python benchmarks/train_step.py --device cuda --models resnet18 --compile-modes default --pipelines ""
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader_wait import PIPELINES, loader_wait_rows  # noqa: E402
from machine import describe_machine, machine_label, results_tag  # noqa: E402

from fastmem.models import create_model  # noqa: E402
from fastmem.runtime import COMPILE_MODES, set_cpu_threads  # noqa: E402
from fastmem.train.build import adam_flags  # noqa: E402
from fastmem.train.cuda_graph import SELF_GRAPHING_COMPILE_MODES, CudaGraphStep, StepFn  # noqa: E402
from fastmem.train.loop import compute_loss, train_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = "fp32 NCHW (reference)"
TARGET_IMAGES_PER_S, TARGET_RATIO = 70_000, 2.5  # ResNet-18 + B = 65,536, batch 256, one H100/H200


@dataclass(frozen=True)
class StepConfig:
    """One row: how the step is executed, and the row it adds one change to."""

    label: str
    channels_last: bool
    dtype: torch.dtype | None
    builds_on: str | None = None
    fused_adam: bool = False  # the trainer's CUDA Adam (fused; capturable under the CUDA graph)
    compile_mode: str | None = None  # torch.compile mode; None = eager
    cuda_graph: bool = False
    cuda_only: bool = False


def configurations(compile_modes: Sequence[str], gpu: bool) -> list[StepConfig]:
    """The rows in the order they are reported (CUDA-only rows included: a CPU run skips them with a note)."""
    bf16, fused = "bf16 channels_last", "bf16 channels_last + fused Adam"
    rows = [StepConfig(REFERENCE, False, None), StepConfig("fp32 channels_last", True, None, REFERENCE),
            StepConfig(bf16, True, torch.bfloat16, "fp32 channels_last"),
            StepConfig("fp16 channels_last", True, torch.float16, "fp32 channels_last", cuda_only=True),
            StepConfig(fused, True, torch.bfloat16, bf16, fused_adam=True, cuda_only=True)]
    if not gpu:  # the CPU's compile row: the trainer's CPU Adam is not fused
        rows += [StepConfig(f"{bf16} + compile {mode}", True, torch.bfloat16, bf16, compile_mode=mode)
                 for mode in compile_modes]
    rows += [StepConfig(f"{fused} + compile {mode}", True, torch.bfloat16, fused, True, mode, cuda_only=True)
             for mode in compile_modes]
    graph = f"{fused} + CUDA graph"
    rows.append(StepConfig(graph, True, torch.bfloat16, fused, True, None, True, cuda_only=True))
    rows += [StepConfig(f"{fused} + compile {mode} + CUDA graph", True, torch.bfloat16, graph, True, mode, True,
                        cuda_only=True) for mode in compile_modes if mode not in SELF_GRAPHING_COMPILE_MODES]
    return rows


def make_step(config: StepConfig, model: torch.nn.Module, device: torch.device) -> StepFn:
    """The trainer's step for `config`: its optimizer choices, `train_step` or the CUDA-graph replay."""
    flags = adam_flags(device, config.cuda_graph) if config.fused_adam else {}
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, **flags)
    step_model = torch.compile(model, mode=config.compile_mode) if config.compile_mode else model
    if config.cuda_graph:
        return CudaGraphStep(step_model, optimizer, functools.partial(compute_loss, "mse"), config.dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=config.dtype == torch.float16)
    new_step = config.compile_mode in SELF_GRAPHING_COMPILE_MODES  # Inductor's own graphs: one step per call

    def step(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if new_step:
            torch.compiler.cudagraph_mark_step_begin()
        return train_step(step_model, optimizer, scaler, images, targets, "mse", device, config.dtype)

    return step


def measure(model_name: str, bottleneck: int, batch: int, steps: int, warmup: int, device: torch.device,
            config: StepConfig) -> float:
    """Images/s of `steps` timed training steps after `warmup` untimed ones (compilation and capture in them)."""
    torch.manual_seed(0)
    if config.compile_mode:
        torch._dynamo.reset()  # each compiled row compiles afresh, in its own mode
    model = create_model(model_name, num_classes=10, in_channels=3, image_size=32, bottleneck_dim=bottleneck).to(device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    step = make_step(config, model, device)
    images = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    targets = torch.randint(0, 10, (batch,), device=device)
    for _ in range(warmup):
        step(images, targets)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step(images, targets)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = batch * steps / (time.perf_counter() - started)
    del step, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # a captured graph's private pool, compiled rows' buffers
    return rate


def warmup_steps(config: StepConfig) -> int:
    """Untimed steps: 3 eager; the graph's 3 eager + capture + 2 replays; compilation and Inductor's graphs 10."""
    return 10 if config.compile_mode else 6 if config.cuda_graph else 3


def result_rows(models: Sequence[str], configs: Sequence[StepConfig], best: dict[tuple[str, str], float],
                gpu: bool) -> list[dict[str, object]]:
    """One row per (model, measured config), with its ratio to fp32 NCHW and its gain over the row it builds on."""
    rows: list[dict[str, object]] = []
    width = max(len(c.label) for c in configs)
    for model_name in models:
        bottleneck = 65536 if model_name == "resnet18" else 4096
        baseline = best[model_name, REFERENCE]
        for config in configs:
            if (model_name, config.label) not in best:
                continue
            rate = best[model_name, config.label]
            base = best.get((model_name, config.builds_on)) if config.builds_on else None
            gain = rate / base if base else None
            rows.append({"model": model_name, "bottleneck_dim": bottleneck, "config": config.label,
                         "builds_on": config.builds_on, "images_per_s": rate, "ratio_to_fp32_nchw": rate / baseline,
                         "gain_over_builds_on": gain})
            print(f"{model_name:>10} B={bottleneck:<6} {config.label:<{width}} {rate:10.0f} img/s  {rate / baseline:5.2f}x"
                  + (f"  {gain:5.2f}x over {config.builds_on}" if gain else ""), flush=True)
        if gpu and model_name == "resnet18":
            label, rate = max(((c.label, best[model_name, c.label]) for c in configs if (model_name, c.label) in best),
                              key=lambda item: item[1])
            met = rate >= TARGET_IMAGES_PER_S and rate / baseline >= TARGET_RATIO
            print(f"target (resnet18 B=65536: >= {TARGET_IMAGES_PER_S} img/s and >= {TARGET_RATIO}x fp32 NCHW): "
                  f"{'met' if met else 'NOT met'} by the best row, {label}: {rate:.0f} img/s, {rate / baseline:.2f}x")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="small_cnn,resnet18", help="comma-separated model names")
    parser.add_argument("--batch-size", type=int, default=0, help="0 = 256 on GPU, 64 on CPU")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (0 = 50 on GPU, 5 on CPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="include the torch.compile rows (default: on GPU)")
    parser.add_argument("--compile-modes", default="", help="comma-separated torch.compile modes of the compile rows "
                        f"({', '.join(COMPILE_MODES)}; default: default,reduce-overhead,max-autotune on GPU, "
                        "default on CPU with --compile)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--out", default="", help="results file (default: results/train_step-<machine>.json)")
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
    modes = [m for m in (args.compile_modes or ("default,reduce-overhead,max-autotune" if gpu else "default")).split(",")
             if m] if with_compile else []
    unknown = sorted(set(modes) - set(COMPILE_MODES))
    if unknown:
        parser.error(f"unknown --compile-modes {', '.join(unknown)}; choose from {', '.join(COMPILE_MODES)}")
    machine = describe_machine(device)
    load_before = os.getloadavg()
    repeats = args.repeats or (1 if gpu else 2)
    models = args.models.split(",")
    configs = configurations(modes, gpu)
    skipped = {c.label: "needs CUDA" for c in configs if c.cuda_only and not gpu}
    best: dict[tuple[str, str], float] = {}
    for _ in range(repeats):  # interleaved: a burst of load on a shared machine hits every configuration
        for model_name in models:
            bottleneck = 65536 if model_name == "resnet18" else 4096
            for config in configs:
                if config.label in skipped:
                    continue
                rate = measure(model_name, bottleneck, batch, steps, warmup_steps(config), device, config)
                best[model_name, config.label] = max(rate, best.get((model_name, config.label), 0.0))
    rows = result_rows(models, configs, best, gpu)
    for label, why in skipped.items():
        print(f"skipped: {label} ({why})")
    print(f"machine: {machine_label(machine)}; batch {batch}, {steps} timed steps, best of {repeats}; inputs "
          f"resident, no loader; load average {load_before[0]:.1f} → {os.getloadavg()[0]:.1f}")
    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    loader_models = [m for m in (args.loader_models or ("small_cnn,resnet18" if gpu else "small_cnn")).split(",") if m]
    loader_steps = args.loader_steps or (50 if gpu else 16)
    loader_dtype = torch.bfloat16 if gpu else None  # the trainer's `auto` precision
    loader_rows, loader_skipped = loader_wait_rows(loader_models, pipelines, batch, loader_steps, 8, device,
                                            loader_dtype) if pipelines else ([], {})
    load_after = os.getloadavg()
    print(f"loader wait: full augmentation, 32 px synthetic images, batch {batch}, {loader_steps} timed steps, "
          f"channels_last, {'bf16' if gpu else 'fp32'}; load average {load_before[0]:.1f} → {load_after[0]:.1f}, "
          f"torch threads {torch.get_num_threads()}")
    out = Path(args.out) if args.out else RESULTS / f"train_step-{results_tag(machine)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "train_step", "machine": machine, "batch_size": batch, "steps": steps, "repeats": repeats,
               "rows": rows, "skipped_rows": skipped, "compile_modes": modes,
               "loader_wait": {"rows": loader_rows, "skipped": loader_skipped, "steps": loader_steps, "augment": "full",
                               "image_size": 32, "precision": "bf16" if gpu else "fp32"},
               "load_average": [load_before[0], load_after[0]], "torch_threads": torch.get_num_threads(),
               "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
