"""Names the machine a benchmark ran on (CPU model and cores, GPU name), for every results file."""

from __future__ import annotations

from fastmem.runtime import cpu_name, describe_machine

__all__ = ["cpu_name", "describe_machine", "machine_label", "results_tag"]


def machine_label(info: dict[str, str | int]) -> str:
    return str(info["gpu"]) if "gpu" in info else f"{info['cpu']} ({info['cores']} cores)"


def results_tag(info: dict[str, str | int]) -> str:
    """'cpu', or 'gpu-<model>' from the GPU's name (e.g. 'NVIDIA H100 80GB HBM3' → 'gpu-H100'), for file names."""
    if "gpu" not in info:
        return "cpu"
    words = str(info["gpu"]).replace("NVIDIA", "").split()
    model = next((w for w in words if any(c.isdigit() for c in w) and any(c.isalpha() for c in w)), "-".join(words))
    return "gpu-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in model)
