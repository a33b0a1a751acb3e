"""How a run executes: which device, which autocast dtype, and the registries of those choices.

The registries here (`PRECISIONS`, `EXTRACT_BACKENDS`, `COMPILE_MODES`) sit low in the import order so that the run's
config (fastmem/run/config.py) can take its choices from them without importing the probe or trainer.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from pathlib import Path

import torch

from fastmem.errors import FastmemError, fail
from fastmem.io_utils import write_json_atomic

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


# CPU features that execute bf16 natively (AMX tiles, AVX-512 BF16); without them bf16 is emulated and slow.
CPU_BF16_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")
# `auto` picks bf16 on a CPU only if a conv training step runs at least this much faster in it than in fp32.
CPU_BF16_MIN_SPEEDUP = 1.25


@dataclass(frozen=True)
class CpuPrecisionChoice:
    """What `--precision auto` chose on this CPU, and why (recorded in the run's summary)."""

    dtype: torch.dtype | None
    reason: str

    @property
    def name(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"


def cpu_bf16_flags(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The native-bf16 CPU flags this machine has (read from /proc/cpuinfo; none where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ()
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return tuple(flag for flag in CPU_BF16_FLAGS if flag in flags)


def measure_cpu_bf16_speedup(repeats: int = 3) -> float:
    """fp32 time / bf16-autocast time of a small conv training step (channels_last, the CPU models' shapes).

    Takes a fraction of a second; each precision's best of `repeats` timed steps after one warm-up step.
    """
    generator = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(16, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10, bias=False),
    ).to(memory_format=torch.channels_last)
    images = torch.randn(32, 16, 16, 16, generator=generator).contiguous(memory_format=torch.channels_last)
    best: dict[str, float] = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        times = []
        for _ in range(repeats + 1):
            started = time.perf_counter()
            with autocast(torch.device("cpu"), dtype):
                loss = net(images).float().square().mean()
            loss.backward()
            times.append(time.perf_counter() - started)
        best[name] = min(times[1:])
    return best["fp32"] / best["bf16"]


def _cpu_identity() -> str:
    """This CPU and software, as the key of the cached choice: model name, bf16 flags, torch version."""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "unknown")
    except OSError:
        model = "unknown"
    return f"{model} | {','.join(cpu_bf16_flags())} | torch {torch.__version__}"


def _choice_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastmem" / "cpu-precision.json"


@functools.cache
def cpu_precision_choice() -> CpuPrecisionChoice:
    """`--precision auto` on a CPU: bf16 where the CPU has native bf16 and a measured step is clearly faster.

    The measurement is made once per machine (CPU model, flags and torch version) and kept in
    `$XDG_CACHE_HOME/fastmem/cpu-precision.json`, so every later run on it chooses the same.
    """
    flags = cpu_bf16_flags()
    if not flags:
        return CpuPrecisionChoice(None, "fp32: this CPU has no native bf16 (no amx_bf16 or avx512_bf16 flag)")
    identity, cache = _cpu_identity(), _choice_cache()
    try:
        saved = json.loads(cache.read_text())
        if saved.get("cpu") == identity and saved.get("precision") in ("bf16", "fp32"):
            return CpuPrecisionChoice(torch.bfloat16 if saved["precision"] == "bf16" else None, str(saved["reason"]))
    except (OSError, ValueError, AttributeError, KeyError):
        pass
    speedup = measure_cpu_bf16_speedup()
    verdict = "bf16" if speedup >= CPU_BF16_MIN_SPEEDUP else "fp32"
    reason = (f"{verdict}: native bf16 ({', '.join(flags)}); a conv training step measured {speedup:.2f}× "
              f"faster in bf16 than fp32 (bf16 needs ≥ {CPU_BF16_MIN_SPEEDUP}×)")
    try:
        write_json_atomic(cache, {"cpu": identity, "precision": verdict, "reason": reason})
    except (OSError, FastmemError):
        pass  # an unwritable cache only means measuring again next time
    return CpuPrecisionChoice(torch.bfloat16 if verdict == "bf16" else None, reason)


def resolve_precision(precision: str, device: torch.device, recorded: str | None = None) -> torch.dtype | None:
    """Autocast dtype for `precision` on `device` (None = fp32).

    'auto' is bf16 on CUDA (fp16 where bf16 is unsupported). On a CPU it is bf16 only where the CPU
    executes bf16 natively (amx_bf16 / avx512_bf16) *and* a one-time timed conv step is at least
    CPU_BF16_MIN_SPEEDUP× faster in bf16 (`cpu_precision_choice`), else fp32: without native bf16 the
    small convolutions of CPU-sized models run slower in bf16 (measured: 1.08k vs 1.26k img/s).
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
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


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
