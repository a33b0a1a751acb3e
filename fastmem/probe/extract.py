"""Layer embeddings: run a model in eval mode over clean images and collect every probe point.

Spatial maps are globally average-pooled by the model (`forward_probes`); layers wider than
`project_dim` (when set) are reduced by a seeded Gaussian random projection. Each embedding is
L2-normalized in fp32 and stored as float16 on the host (cosine k-NN needs only directions); the
fp32 norms are kept beside it.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fastmem.models import EncoderProjector
from fastmem.runtime import autocast


@dataclass(frozen=True)
class Embedding:
    """Unit-norm float16 vectors (N, D) and their fp32 norms before normalization."""

    vectors: np.ndarray
    norms: np.ndarray


def reduction_name(project_dim: int, seed: int) -> str:
    """Names the reduction in cache keys: 'gap' or 'gap-rp<dim>-s<seed>'."""
    return "gap" if project_dim <= 0 else f"gap-rp{project_dim}-s{seed}"


def projection_matrix(in_dim: int, out_dim: int, layer: str, seed: int, device: torch.device) -> torch.Tensor:
    """A seeded Gaussian (in_dim, out_dim) matrix; the same for the same (layer, dims, seed)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(layer.encode()) + in_dim)
    return (torch.randn(in_dim, out_dim, generator=generator) / out_dim**0.5).to(device)


@torch.no_grad()
def extract_embeddings(
    model: EncoderProjector,
    images: np.ndarray,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    layers: tuple[str, ...] | None = None,
    batch_size: int = 1024,
    channels_last: bool = True,
    project_dim: int = 0,
    project_seed: int = 0,
    forward: Callable[[torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
) -> OrderedDict[str, Embedding]:
    """Every requested probe point's embedding of uint8 NHWC `images`, in probe order.

    `forward` replaces `model.forward_probes` (e.g. a TensorRT engine of it, see trt_extract.py).
    """
    wanted = tuple(layers or model.probe_points)
    was_training = model.training
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    vectors: dict[str, np.ndarray] = {}
    norms: dict[str, np.ndarray] = {}
    projections: dict[str, torch.Tensor] = {}
    try:
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
            batch = batch.permute(0, 3, 1, 2).float().div_(255).contiguous(memory_format=memory_format)
            with autocast(device, dtype):
                probes = (forward or model.forward_probes)(batch)
            for name in wanted:
                value = probes[name].float()
                if 0 < project_dim < value.shape[1]:
                    if name not in projections:
                        projections[name] = projection_matrix(value.shape[1], project_dim, name, project_seed, device)
                    value = value @ projections[name]
                if name not in vectors:
                    vectors[name] = np.empty((len(images), value.shape[1]), dtype=np.float16)
                    norms[name] = np.empty(len(images), dtype=np.float32)
                end = start + value.shape[0]
                vectors[name][start:end] = F.normalize(value, dim=1).to(torch.float16).cpu().numpy()
                norms[name][start:end] = value.norm(dim=1).cpu().numpy()
    finally:
        model.train(was_training)
    return OrderedDict((name, Embedding(vectors[name], norms[name])) for name in wanted)
