"""Picks the executor for a batch: the fused one for the images' device where it supports the views
(numba on CPU, Triton on CUDA), else the torch reference executor. Backends call this, so the
choice is made in one place."""

from __future__ import annotations

import torch
from fastmem.pipelines.executors import fused_cpu, fused_cuda
from fastmem.pipelines.executors.reference import apply_views
from fastmem.pipelines.params import ViewParams


def apply_views_fastest(
    images: torch.Tensor, params: ViewParams, out: torch.Tensor | None = None, channels_last: bool = True,
    *, rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Execute `params` on `images` (or on `images[rows]`) with the fastest executor that supports them."""
    fused = fused_cuda if images.is_cuda else fused_cpu
    if fused.AVAILABLE and fused.supports(params, images):
        return fused.apply_views(images, params, out, channels_last, rows=rows)  # reads rows in place: no gather
    return apply_views(images if rows is None else images[rows], params, out, channels_last)
