"""How a run executes: which device, which autocast dtype, and the registries of those choices.

The registries here (`PRECISIONS`, `EXTRACT_BACKENDS`, `COMPILE_MODES`) sit low in the import order so that the run's
config (fastmem/run/config.py) can take its choices from them without importing the probe or trainer.
"""

from __future__ import annotations

import contextlib
import os
import platform
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path

import torch

from fastmem.cpu_precision import cpu_precision_choice
from fastmem.errors import fail

PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")  # resolve_precision maps each to a dtype
# How the probe embeds images: eager (the model's own forward) or trt (a torch-tensorrt engine of it);
# fastmem/probe/trt_extract.py holds one forward builder per name.
EXTRACT_BACKENDS: tuple[str, ...] = ("eager", "trt")
# torch.compile's modes (`--compile-mode`); reduce-overhead and max-autotune also capture CUDA graphs.
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda when available else cpu; 'cuda' without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda requested but no CUDA GPU is available (use --device cpu or auto)")
    if name != "cpu" and not name.startswith("cuda"):
        fail(f"unknown device {name!r}; use auto, cpu or cuda[:N]")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device, recorded: str | None = None) -> torch.dtype | None:
    """Autocast dtype for `precision` on `device` (None = fp32).

    'auto' is bf16 on CUDA (fp16 where bf16 is unsupported). On a CPU it is this machine's one decision
    (fastmem/cpu_precision.py): bf16 only where the CPU executes bf16 natively (amx_bf16 / avx512_bf16) *and*
    the cpu scale's training step measurably runs at least 1.25× faster in it, else fp32.
    `recorded`: what a run being resumed chose ('bf16' or 'fp32'), kept so that it continues as it began.
    """
    if precision not in PRECISIONS:
        fail(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        fail("--precision fp16 needs a CUDA device (fp16 autocast with a grad scaler); use bf16 or fp32 on CPU")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if recorded in ("bf16", "fp32"):
            return torch.bfloat16 if recorded == "bf16" else None
        return cpu_precision_choice().dtype
    return precision_dtype(precision)


def precision_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision name ('bf16', 'fp16', 'fp32'; None = fp32): precision_name's inverse."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)


def precision_reason(precision: str, device: torch.device, dtype: torch.dtype | None, resumed: bool = False) -> str:
    """Why `precision` on `device` became `dtype` (recorded in config.json)."""
    if precision != "auto":
        return f"{precision_name(dtype)}: as requested"
    if device.type == "cuda":
        return f"{precision_name(dtype)}: auto on CUDA"
    if resumed:
        return f"{precision_name(dtype)}: what this run chose when it started (auto)"
    return cpu_precision_choice().reason


def precision_name(dtype: torch.dtype | None) -> str:
    """The --precision value a resolved autocast dtype corresponds to."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32") if dtype is not None else "fp32"


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager[object]:
    """An autocast context for `dtype`, or a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_cpu_threads(threads: int) -> None:
    """Use `threads` CPU threads in torch and in the numba kernels of the fused CPU executor."""
    torch.set_num_threads(threads)
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_machine(device: torch.device | None = None) -> dict[str, str | int]:
    """CPU model, visible cores, torch version, and the GPU's name when `device` is CUDA (for results files)."""
    info: dict[str, str | int] = {
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0,
        "torch": torch.__version__,
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
