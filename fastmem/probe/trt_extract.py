"""Opt-in TensorRT extraction (`--extract-backend trt`): a torch-tensorrt engine of the model's probe forward.

Owns the choice of the forward function that embeds a batch for the probe: the model's own
`forward_probes` (eager), or a torch-tensorrt engine of it, built for a dynamic batch (1 … the
extraction batch) in the probe's precision (fp16/bf16 weights and inputs; fp32 when the probe runs in
fp32) and cached on disk beside the checkpoint, keyed by the weights' digest, the precision and the
input shape. Without torch-tensorrt or a CUDA device it falls back to eager with one printed line.
Tolerance: the k-NN accuracy of a TRT probe equals the eager one within 0.1 point (tests/train/test_scaleout_gpu.py).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmem.errors import fail
from fastmem.models import EncoderProjector
from fastmem.runtime import EXTRACT_BACKENDS

TRT_ENGINE_DIR = "trt-engines"  # beside the checkpoint: RUN_DIR/trt-engines/<digest>-<precision>-<shape>.ep
ProbeForward = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]
_fallback_reported: set[str] = set()  # one line per reason and process, not one per probe


class ProbeOutputs(nn.Module):
    """The model's probe points as a tuple in probe order (what an exported engine can return)."""

    def __init__(self, model: EncoderProjector) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(model.probe_points)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # forward_probes without its OrderedDict reordering: plain dict stores trace cleanly under torch.export
        probes: dict[str, torch.Tensor] = {}
        h = self.model.encoder(images, collect=probes)
        probes["h"] = h
        probes["z"] = self.model.projector(h, collect=probes)
        return tuple(probes[name] for name in self.names)


def trt_unavailable_reason(device: torch.device) -> str | None:
    """Why a TRT engine cannot be used here (None when it can)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "it needs a CUDA device"
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        return "torch-tensorrt is not installed (pip install -e .[trt])"
    return None


def report_fallback(reason: str) -> None:
    if reason not in _fallback_reported:
        _fallback_reported.add(reason)
        print(f"fastmem: --extract-backend trt unavailable ({reason}); extracting embeddings eagerly", flush=True)


def engine_path(engine_dir: Path, weights: str, dtype: torch.dtype | None, sample_shape: tuple[int, int, int],
                max_batch: int) -> Path:
    """Where the engine of these weights, precision and input shape is cached."""
    import torch_tensorrt

    precision = str(dtype or torch.float32).removeprefix("torch.")
    shape = "x".join(map(str, sample_shape))
    version = getattr(torch_tensorrt, "__version__", "unknown").replace("+", "_")
    return engine_dir / f"{weights}-{precision}-{shape}-b{max_batch}-trt{version}.ep"


def build_engine(model: EncoderProjector, device: torch.device, dtype: torch.dtype | None,
                 sample_shape: tuple[int, int, int], max_batch: int) -> nn.Module:
    """Compile the probe forward with torch-tensorrt (dynamo IR) for batches of 1 … `max_batch`."""
    import copy

    import torch_tensorrt

    precision = dtype or torch.float32
    wrapper = ProbeOutputs(copy.deepcopy(model).eval().to(device=device, dtype=precision))
    spec = torch_tensorrt.Input(min_shape=(1, *sample_shape), opt_shape=(max_batch, *sample_shape),
                                max_shape=(max_batch, *sample_shape), dtype=precision)
    with torch.no_grad():
        return torch_tensorrt.compile(wrapper, ir="dynamo", inputs=[spec], min_block_size=1)


def save_engine(engine: nn.Module, path: Path, example: torch.Tensor) -> None:
    """Write the engine atomically; a failure costs only the cache, with one printed line."""
    import torch_tensorrt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.ep")
    try:
        try:
            torch_tensorrt.save(engine, str(tmp), arg_inputs=[example])
        except TypeError:  # releases before arg_inputs= named it inputs=
            torch_tensorrt.save(engine, str(tmp), inputs=[example])
        os.replace(tmp, path)
    except Exception as err:  # noqa: BLE001 - any serialization failure: keep the in-memory engine
        print(f"fastmem: could not cache the TensorRT engine at {path} ({type(err).__name__}); using it uncached",
              flush=True)
    finally:
        tmp.unlink(missing_ok=True)


def load_engine(path: Path) -> nn.Module | None:
    """A cached engine, or None when absent or unloadable (another torch-tensorrt build, a damaged file)."""
    if not path.is_file():
        return None
    try:
        import torch_tensorrt

        return torch_tensorrt.load(str(path)).module()
    except Exception as err:  # noqa: BLE001 - rebuild instead
        print(f"fastmem: cached TensorRT engine {path} is unusable ({type(err).__name__}); rebuilding it", flush=True)
        return None


def trt_forward(
    model: EncoderProjector,
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    sample_shape: tuple[int, int, int],
    max_batch: int,
    engine_dir: str | Path | None,
    weights: str | None,
    write_cache: bool,
) -> ProbeForward | None:
    """A TRT engine's forward, loaded from `engine_dir` or built (and cached); None (eager) where TRT cannot run."""
    reason = trt_unavailable_reason(device)
    if reason is not None:
        report_fallback(reason)
        return None
    from .cache import state_digest

    precision = dtype or torch.float32
    engine = None
    path = None
    if engine_dir is not None:
        path = engine_path(Path(engine_dir), weights or state_digest(model), dtype, sample_shape, max_batch)
        engine = load_engine(path)
    if engine is None:
        engine = build_engine(model, device, dtype, sample_shape, max_batch)
        if path is not None and write_cache:
            save_engine(engine, path, torch.zeros((max_batch, *sample_shape), device=device, dtype=precision))
    names = tuple(model.probe_points)

    def forward(images: torch.Tensor) -> Mapping[str, torch.Tensor]:
        outputs = engine(images.to(precision).contiguous())
        return OrderedDict(zip(names, outputs))

    return forward


def eager_forward(model: EncoderProjector, **_: Any) -> ProbeForward | None:
    """None: extraction runs the model's own `forward_probes`."""
    return None


# One builder per name of fastmem.runtime.EXTRACT_BACKENDS (the registry the config and CLIs take choices from).
FORWARD_BUILDERS: dict[str, Callable[..., ProbeForward | None]] = {"eager": eager_forward, "trt": trt_forward}


def probe_forward(
    model: EncoderProjector,
    backend: str,
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    sample_shape: tuple[int, int, int],
    max_batch: int,
    engine_dir: str | Path | None,
    weights: str | None = None,
    write_cache: bool = True,
) -> ProbeForward | None:
    """The forward that embeds a batch: None for eager (the model's own), or a TRT engine's.

    `sample_shape` is (channels, height, width); `weights` the digest of the model's state (computed
    when None); `write_cache` false on ranks other than 0 (they load or build, never write).
    """
    if backend not in EXTRACT_BACKENDS:
        fail(f"unknown extract backend {backend!r}; use {', '.join(EXTRACT_BACKENDS)}")
    return FORWARD_BUILDERS[backend](model, device=device, dtype=dtype, sample_shape=sample_shape, max_batch=max_batch,
                                     engine_dir=engine_dir, weights=weights, write_cache=write_cache)
