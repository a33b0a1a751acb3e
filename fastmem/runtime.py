"""How a run executes: which device, which autocast dtype, and the registries of those choices.

The registries here (`PRECISIONS`, `EXTRACT_BACKENDS`) sit low in the import order so that the run's
config (fastmem/run/config.py) can take its choices from them without importing the probe or trainer.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager as ContextManager

import torch

from fastmem.errors import fail

PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")  # resolve_precision maps each to a dtype
# How the probe embeds images: eager (the model's own forward) or trt (a torch-tensorrt engine of it);
# fastmem/probe/trt_extract.py holds one forward builder per name.
EXTRACT_BACKENDS: tuple[str, ...] = ("eager", "trt")


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda when available else cpu; 'cuda' without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda requested but no CUDA GPU is available (use --device cpu or auto)")
    if name != "cpu" and not name.startswith("cuda"):
        fail(f"unknown device {name!r}; use auto, cpu or cuda[:N]")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `precision` on `device` (None = fp32).

    'auto' is bf16 on CUDA (fp16 where bf16 is unsupported) and fp32 on CPU: on CPUs, bf16 speeds up
    matmuls but slows the small convolutions of CPU-sized models (measured: 1.08k vs 1.26k img/s).
    """
    if precision not in PRECISIONS:
        fail(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        fail("--precision fp16 needs a CUDA device (fp16 autocast with a grad scaler); use bf16 or fp32 on CPU")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


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
