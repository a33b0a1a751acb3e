"""Picks the executor for a batch, in one place: the fastest one that implements every op of its views.

For `"fastest"` the candidates are the fused executor for the images' device (numba on CPU, Triton
on CUDA) and then the torch reference; for `"reference"` the reference alone. An executor is taken
only when its `supports()` says it implements every op of the batch's `ViewParams.ops` (and runs on
these images), so an op it lacks sends the batch to the next candidate instead of being skipped;
when no candidate implements the ops, the error says which are missing.
"""

from __future__ import annotations

from types import ModuleType

import torch
from fastmem.pipelines.executors import fused_cpu, fused_cuda, reference
from fastmem.pipelines.params import ViewParams

from fastmem.errors import fail

EXECUTOR_CHOICES: tuple[str, ...] = ("fastest", "reference")


def candidates(choice: str, images: torch.Tensor | None = None) -> tuple[ModuleType, ...]:
    """The executors `choice` may run, fastest first (for `images`' device when given; all devices otherwise)."""
    if choice == "reference":
        return (reference,)
    if choice != "fastest":
        raise ValueError(f"unknown executor choice {choice!r}; expected one of {', '.join(EXECUTOR_CHOICES)}")
    if images is None:
        return (fused_cuda, fused_cpu, reference)
    return (fused_cuda if images.is_cuda else fused_cpu, reference)


def executor_ops(choice: str = "fastest") -> frozenset[str]:
    """Every op some executor of `choice` implements (what a backend running them can execute)."""
    return frozenset().union(*(module.OPS for module in candidates(choice)))


def pick_executor(params: ViewParams, images: torch.Tensor, choice: str = "fastest") -> ModuleType:
    """The first executor of `choice` that implements every op of `params` on `images`; one line if none does."""
    found = candidates(choice, images)
    for module in found:
        if module.supports(params, images):
            return module
    missing = sorted({op for op in params.ops if not any(op in module.OPS for module in found)})
    names = ", ".join(module.__name__.rsplit(".", 1)[-1] for module in found)
    fail(f"no executor implements {', '.join(missing) or 'these views'} of {params.kind} views ({names} tried)")


def apply_views_fastest(
    images: torch.Tensor, params: ViewParams, out: torch.Tensor | None = None, channels_last: bool = True,
    *, rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Execute `params` on `images` (or on `images[rows]`) with the fastest executor that implements them."""
    module = pick_executor(params, images)
    return module.apply_views(images, params, out, channels_last, rows=rows)  # fused ones read rows in place


def apply_views_reference(
    images: torch.Tensor, params: ViewParams, out: torch.Tensor | None = None, channels_last: bool = True,
    *, rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Execute `params` with the reference executor alone (what the `torch` baseline runs)."""
    module = pick_executor(params, images, "reference")
    return module.apply_views(images, params, out, channels_last, rows=rows)
