"""CuPy launches of the knn_topk.cu kernels on torch tensors, for the CUDA k-NN search (knn_cuda.py).

Owns the compiled module (NVRTC, once), the check that CuPy and a GPU are usable (never raising),
and `CupyKernels`: each launch wraps torch tensors zero-copy (DLPack) and runs in torch's current
stream. `KernelOps` is the interface the search needs, so CPU tests can run it with torch stand-ins.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

KERNEL_SOURCE = Path(__file__).with_name("knn_topk.cu")
MISSING_MESSAGE = "CUDA k-NN needs CuPy and a GPU: pip install -e .[cuda12] or .[cuda13]"
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


class KernelOps(Protocol):
    """The device kernels the search launches: CupyKernels on CUDA, a torch stand-in in CPU tests."""

    def inv_norms(self, x: torch.Tensor) -> torch.Tensor: ...
    def scale_rows(self, x: torch.Tensor, row0: int, n_valid: int, inv: torch.Tensor, out: torch.Tensor) -> None: ...
    def topk_tile(self, sims: torch.Tensor, n_cols: int, col_offset: int, best_v: torch.Tensor,
                  best_i: torch.Tensor, row0: int) -> None: ...
    def rerank(self, qhat: torch.Tensor, ref: torch.Tensor, ref_inv: torch.Tensor, ref_start: int,
               cand: torch.Tensor) -> torch.Tensor: ...
    def exact_tile(self, qhat: torch.Tensor, qids: torch.Tensor, ref: torch.Tensor, ref_inv: torch.Tensor,
                   row0: int, n_cols: int, out: torch.Tensor) -> None: ...


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str:
    """'' when CuPy imports, torch and CuPy see a GPU and the kernels compile; else why not."""
    try:
        import cupy

        if not torch.cuda.is_available() or cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
        with cupy.cuda.Device(torch.cuda.current_device()):
            _module().get_function("topk_tile_f32")
        return ""
    except Exception as err:  # any failure (no CuPy, no driver, no NVRTC) means "not usable"
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def cuda_available() -> bool:
    """Whether the CUDA k-NN can run here (CuPy, a usable GPU, kernels that compile); never raises."""
    return unavailable_reason() == ""


@functools.lru_cache(maxsize=1)
def _module() -> Any:
    import cupy

    return cupy.RawModule(code=KERNEL_SOURCE.read_text())


class _StreamHandle:
    """A raw stream pointer under the CUDA stream protocol (for cupy.cuda.Stream.from_external)."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


class CupyKernels:
    """Launches the knn_topk.cu kernels on torch tensors (zero-copy DLPack) in torch's current stream."""

    def __init__(self, device: torch.device) -> None:
        import cupy

        self._cp, self._device = cupy, device
        self._kernels: dict[str, Any] = {}

    @contextmanager
    def active(self) -> Iterator[None]:
        """CuPy's device and current stream set to torch's, so launches are ordered with torch's work."""
        ptr = torch.cuda.current_stream(self._device).cuda_stream
        from_external = getattr(self._cp.cuda.Stream, "from_external", None)  # CuPy >= 14
        stream = from_external(_StreamHandle(ptr)) if from_external else self._cp.cuda.ExternalStream(ptr)
        with self._cp.cuda.Device(self._device.index), stream:
            yield

    def _arg(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):  # CuPy has no bfloat16: 16-bit data travels as raw bits
            bits = value.view(torch.int16) if value.dtype in (torch.float16, torch.bfloat16) else value
            return self._cp.from_dlpack(bits)
        return value

    def _launch(self, name: str, grid: tuple[int, ...], block: int, *args: Any) -> None:
        kernel = self._kernels.get(name)
        if kernel is None:
            kernel = self._kernels[name] = _module().get_function(name)
        kernel(grid, (block,), tuple(self._arg(a) for a in args))

    def inv_norms(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
        if x.shape[0]:
            self._launch(f"inv_norms_{_SUFFIX[x.dtype]}", (-(-x.shape[0] // 8),), 256,
                         x, np.int64(x.shape[0]), np.int32(x.shape[1]), out)
        return out

    def scale_rows(self, x: torch.Tensor, row0: int, n_valid: int, inv: torch.Tensor, out: torch.Tensor) -> None:
        if out.shape[0]:
            self._launch(f"scale_rows_{_SUFFIX[x.dtype]}_{_SUFFIX[out.dtype]}", (out.shape[0],), 128,
                         x, np.int64(row0), np.int64(n_valid), inv, out, np.int32(x.shape[1]))

    def topk_tile(self, sims: torch.Tensor, n_cols: int, col_offset: int, best_v: torch.Tensor,
                  best_i: torch.Tensor, row0: int) -> None:
        if sims.shape[0]:
            self._launch(f"topk_tile_{_SUFFIX[sims.dtype]}", (sims.shape[0],), 128, sims, np.int64(sims.shape[1]),
                         np.int32(n_cols), np.int64(col_offset), best_v, best_i, np.int32(best_v.shape[1]),
                         np.int64(row0))

    def rerank(self, qhat: torch.Tensor, ref: torch.Tensor, ref_inv: torch.Tensor, ref_start: int,
               cand: torch.Tensor) -> torch.Tensor:
        out = torch.empty(cand.shape, device=cand.device, dtype=torch.float32)
        if cand.numel():
            self._launch(f"rerank_{_SUFFIX[ref.dtype]}", (cand.shape[0],), 256, qhat, np.int32(qhat.shape[1]), ref,
                         ref_inv, np.int64(ref_start), np.int64(ref.shape[0]), cand, np.int32(cand.shape[1]), out)
        return out

    def exact_tile(self, qhat: torch.Tensor, qids: torch.Tensor, ref: torch.Tensor, ref_inv: torch.Tensor,
                   row0: int, n_cols: int, out: torch.Tensor) -> None:
        if qids.numel() and n_cols:
            self._launch(f"exact_tile_{_SUFFIX[ref.dtype]}", (-(-n_cols // 8), qids.shape[0]), 256, qhat, qids,
                         np.int64(0), np.int32(qhat.shape[1]), ref, ref_inv, np.int64(row0), np.int32(n_cols),
                         out, np.int64(out.shape[1]))
