"""Layer embeddings: run a model in eval mode over clean images and collect every probe point.

Spatial maps are globally average-pooled by the model (`forward_probes`); layers wider than
`project_dim` (when set) are reduced by a seeded Gaussian random projection. Each embedding is
L2-normalized in fp32 and stored as float16 on the host (cosine k-NN needs only directions); the
fp32 norms are kept beside it.

Extraction hands each batch's rows to an `EmbeddingSink` as soon as they are computed: `MemorySink`
(the default) fills arrays in RAM; the disk sinks of stream.py append them to .npy files, so that
peak memory is one batch, whatever N × D. `ExtractionConfig` is the resolved set of options that
decide the bits of an embedding; the cache keys on its digest (cache.py).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

import fastmem
from fastmem.models import EncoderProjector
from fastmem.runtime import autocast

# Bump when what extraction computes changes (pooling, projection, normalization, storage dtype): every
# cached embedding of the previous semantics then misses instead of being reused.
EXTRACTION_VERSION = 2


@dataclass(frozen=True)
class Embedding:
    """Unit-norm float16 vectors (N, D) and their fp32 norms before normalization."""

    vectors: np.ndarray
    norms: np.ndarray


@dataclass(frozen=True)
class ExtractionConfig:
    """Everything that decides an embedding's bits besides the weights and the images, as resolved for a run."""

    precision: str  # the autocast dtype actually used ('float32' for none)
    channels_last: bool
    project_dim: int
    project_seed: int
    backend: str  # the forward actually used: 'eager', or 'trt' for a TensorRT engine
    batch_size: int  # batch composition can change the last bits of a convolution's result
    device: str  # device type: CPU and CUDA kernels round differently

    @classmethod
    def resolve(cls, *, dtype: torch.dtype | None, channels_last: bool, project_dim: int, project_seed: int,
                trt: bool, batch_size: int, device: torch.device) -> ExtractionConfig:
        return cls(precision=str(dtype or torch.float32).removeprefix("torch."), channels_last=channels_last,
                   project_dim=max(project_dim, 0), project_seed=project_seed, backend="trt" if trt else "eager",
                   batch_size=batch_size, device=device.type)

    def reduction(self) -> str:
        """A readable summary for file names: 'gap' or 'gap-rp<dim>-s<seed>', then precision and backend."""
        precision = "" if self.precision == "float32" else "-" + self.precision
        return reduction_name(self.project_dim, self.project_seed) + precision + ("-trt" if self.backend == "trt" else "")

    def identity(self) -> dict[str, object]:
        """The config with the code versions it was extracted under (what a cache entry must match)."""
        return {**asdict(self), "extraction_version": EXTRACTION_VERSION, "fastmem": fastmem.__version__,
                "torch": torch.__version__}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


def reduction_name(project_dim: int, seed: int) -> str:
    """Names the reduction in cache keys: 'gap' or 'gap-rp<dim>-s<seed>'."""
    return "gap" if project_dim <= 0 else f"gap-rp{project_dim}-s{seed}"


def projection_matrix(in_dim: int, out_dim: int, layer: str, seed: int, device: torch.device) -> torch.Tensor:
    """A seeded Gaussian (in_dim, out_dim) matrix; the same for the same (layer, dims, seed)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(layer.encode()) + in_dim)
    return (torch.randn(in_dim, out_dim, generator=generator) / out_dim**0.5).to(device)


class EmbeddingSink(Protocol):
    """Where extraction puts rows: `open` once per layer, `append` its rows in order, then `commit` or `discard`."""

    def open(self, layer: str, rows: int, width: int) -> None: ...

    def append(self, layer: str, vectors: np.ndarray, norms: np.ndarray) -> None: ...

    def commit(self) -> dict[str, Embedding]: ...

    def discard(self, error: BaseException) -> None: ...


class MemorySink:
    """Rows into preallocated host arrays (N × D in RAM)."""

    def __init__(self) -> None:
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._filled: dict[str, int] = {}

    def open(self, layer: str, rows: int, width: int) -> None:
        self._arrays[layer] = (np.empty((rows, width), dtype=np.float16), np.empty(rows, dtype=np.float32))
        self._filled[layer] = 0

    def append(self, layer: str, vectors: np.ndarray, norms: np.ndarray) -> None:
        start = self._filled[layer]
        self._arrays[layer][0][start : start + len(vectors)] = vectors
        self._arrays[layer][1][start : start + len(vectors)] = norms
        self._filled[layer] = start + len(vectors)

    def commit(self) -> dict[str, Embedding]:
        return {layer: Embedding(*arrays) for layer, arrays in self._arrays.items()}

    def discard(self, error: BaseException) -> None:
        self._arrays.clear()


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
    sink: EmbeddingSink | None = None,
) -> OrderedDict[str, Embedding]:
    """Every requested probe point's embedding of uint8 NHWC `images`, in probe order.

    `forward` replaces `model.forward_probes` (e.g. a TensorRT engine of it, see trt_extract.py).
    `sink` receives the rows batch by batch (default: in memory); on any error it is discarded.
    """
    wanted = tuple(layers or model.probe_points)
    sink = sink if sink is not None else MemorySink()
    was_training = model.training
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
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
                if start == 0:
                    sink.open(name, len(images), value.shape[1])
                sink.append(name, F.normalize(value, dim=1).to(torch.float16).cpu().numpy(),
                            value.norm(dim=1).cpu().numpy())
            del probes, batch, value  # before the next forward: one batch's tensors alive at a time
        embeddings = sink.commit()
    except BaseException as error:
        sink.discard(error)
        raise
    finally:
        model.train(was_training)
    return OrderedDict((name, embeddings[name]) for name in wanted)
