"""Names the machine a benchmark ran on (CPU model and cores, GPU name), for every results file."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_machine(device: torch.device) -> dict[str, str | int]:
    """CPU model, visible cores, torch version, and the GPU's name when `device` is CUDA."""
    info: dict[str, str | int] = {
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0,
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_label(info: dict[str, str | int]) -> str:
    return str(info["gpu"]) if "gpu" in info else f"{info['cpu']} ({info['cores']} cores)"


def results_tag(info: dict[str, str | int]) -> str:
    """'cpu', or 'gpu-<model>' from the GPU's name (e.g. 'NVIDIA H100 80GB HBM3' → 'gpu-H100'), for file names."""
    if "gpu" not in info:
        return "cpu"
    words = str(info["gpu"]).replace("NVIDIA", "").split()
    model = next((w for w in words if any(c.isdigit() for c in w) and any(c.isalpha() for c in w)), "-".join(words))
    return "gpu-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in model)
