"""The fused executors (numba on CPU, Triton on CUDA) produce the torch reference executor's views.

Geometry (crop-resize, reflect-translate, flip) matches to float rounding (≤ 1e-5); colour jitter and
grayscale within the contract's 2/255. GPU tests are marked `gpu` and skipped without CUDA; the
Triton kernel's semantics are also checked on CPU through Triton's interpreter.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fastmem.pipelines.executors import fused_cpu, fused_cuda, reference
from fastmem.pipelines.params import AugmentSpec, sample_view_params

HERE = Path(__file__).resolve().parent  # this stage's tests; conftest one folder up

GEOMETRY_ATOL = 1e-5
PHOTOMETRIC_ATOL = 2 / 255
CUDA_READY = torch.cuda.is_available() and fused_cuda.AVAILABLE


def on_cuda(test):
    """Mark a test `gpu` and skip it without CUDA (or Triton)."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and Triton")(test))


def _images(n: int, size: tuple[int, int], channels: int, seed: int = 0) -> torch.Tensor:
    """Uniform noise plus coarse-level images (ties between channels, gray pixels: the hue edge cases)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (n, *size, channels), generator=gen, dtype=torch.uint8)
    levels = torch.tensor([0, 64, 128, 255], dtype=torch.uint8)[torch.randint(0, 4, (n, *size, channels), generator=gen)]
    return torch.where(torch.arange(n).view(n, 1, 1, 1) % 2 == 0, noise, levels)


def _params(kind: str, n: int, size: tuple[int, int], channels: int, device: str = "cpu"):
    indices = torch.arange(n, device=device)
    return sample_view_params(AugmentSpec.parse(kind), 7, indices, torch.full((n,), 3, device=device), size, channels)


def _subset(params, pick: slice, device: str | None = None):
    """The views `pick` of `params` (moved to `device` if given)."""
    fields = ("crop", "flip", "jitter", "factors", "order", "grayscale", "ra_ops", "ra_magnitudes")
    return dataclasses.replace(params, **{f: getattr(params, f)[pick].to(device or getattr(params, f).device)
                                          for f in fields})


def _assert_matches_reference(got: torch.Tensor, ref: torch.Tensor, params) -> None:
    assert got.shape == ref.shape and got.dtype == torch.float32
    geometric = ~(params.jitter | params.grayscale)
    assert geometric.any()
    diff = (got.float() - ref).abs().amax(dim=(1, 2, 3))
    assert float(diff[geometric].max()) <= GEOMETRY_ATOL, "geometry differs from the reference executor"
    assert float(diff.max()) <= PHOTOMETRIC_ATOL, f"photometric error {float(diff.max()) * 255:.3f}/255"


# ---- numba (CPU) ----
@pytest.mark.parametrize("kind", ["none", "standard", "full"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(28, 28), (32, 32), (13, 13), (9, 14)])
def test_fused_cpu_matches_the_reference_executor(kind: str, channels: int, size: tuple[int, int]) -> None:
    images, params = _images(64, size, channels), _params(kind, 64, size, channels)
    got = fused_cpu.apply_views(images, params)
    assert got.is_contiguous(memory_format=torch.channels_last)
    _assert_matches_reference(got, reference.apply_views(images, params), params)


def test_fused_cpu_reads_a_resident_dataset_and_nchw_input() -> None:
    data = _images(50, (32, 32), 3)
    rows = torch.tensor([3, 49, 3, 0, 17, 17, 8, 21])
    params = _params("full", 8, (32, 32), 3)
    gathered = fused_cpu.apply_views(data[rows], params)
    assert torch.equal(fused_cpu.apply_views(data, params, rows=rows), gathered)
    assert torch.equal(fused_cpu.apply_views(data[rows].permute(0, 3, 1, 2).contiguous(), params), gathered)
    # A view's pixels do not depend on the batch it was computed in.
    assert torch.equal(fused_cpu.apply_views(data[rows[:4]], _subset(params, slice(0, 4))), gathered[:4])


def test_fused_cpu_fills_a_preallocated_output_of_each_dtype_and_layout() -> None:
    images, params = _images(16, (32, 32), 3), _params("full", 16, (32, 32), 3)
    full = fused_cpu.apply_views(images, params)
    out = torch.empty((16, 32, 32, 3)).permute(0, 3, 1, 2)
    assert fused_cpu.apply_views(images, params, out) is out and torch.equal(out, full)
    planar = torch.empty(16, 3, 32, 32)
    assert fused_cpu.apply_views(images, params, planar) is planar and torch.equal(planar, full)
    fresh = fused_cpu.apply_views(images, params, channels_last=False)
    assert fresh.is_contiguous() and torch.equal(fresh, full)
    for dtype in (torch.bfloat16, torch.float16):
        low = fused_cpu.apply_views(images, params, dtype=dtype)
        assert low.dtype == dtype and low.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(low, full.to(dtype))  # round to nearest even, as torch's cast


def test_fused_cpu_declines_randaugment_and_mismatched_inputs() -> None:
    params = _params("strength:0.5", 4, (32, 32), 3)
    assert not fused_cpu.supports(params) and fused_cpu.supports(_params("full", 4, (32, 32), 3))
    with pytest.raises(ValueError, match="does not implement randaugment .strength views."):
        fused_cpu.apply_views(_images(4, (32, 32), 3), params)
    with pytest.raises(ValueError, match="views"):
        fused_cpu.apply_views(_images(5, (32, 32), 3), _params("full", 4, (32, 32), 3))


# ---- Triton kernel through the interpreter (CPU) ----
_INTERPRETED_CHECK = """
import torch
from fastmem.pipelines.executors import fused_cuda, reference
from test_fused_executors import _assert_matches_reference, _images, _params
assert fused_cuda.INTERPRET
cases = [("standard", 1, (9, 14)), ("full", 3, (32, 32)), ("full", 1, (36, 36)), ("full", 3, (40, 40)), ("full", 3, (64, 48))]
for kind, channels, size in cases:  # the last three take the kernel's tile loop (> 1,024 pixels)
    images, params = _images(6, size, channels), _params(kind, 6, size, channels)
    _assert_matches_reference(fused_cuda.apply_views(images, params), reference.apply_views(images, params), params)
print("ok")
"""


@pytest.mark.skipif(not fused_cuda.AVAILABLE, reason="needs Triton")
def test_triton_kernel_matches_the_reference_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    result = subprocess.run([sys.executable, "-c", _INTERPRETED_CHECK], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


# ---- Triton on CUDA ----
@pytest.mark.skipif(not fused_cuda.AVAILABLE or fused_cuda.INTERPRET, reason="needs Triton, not its interpreter")
def test_fused_cuda_takes_images_of_any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # judge the sizes as if a GPU were there
    for size in [(32, 32), (40, 40), (64, 64), (224, 224)]:
        assert fused_cuda.supports(_params("full", 4, size, 3), None)
    assert not fused_cuda.supports(_params("strength:0.5", 4, (32, 32), 3), None)


@on_cuda
@pytest.mark.parametrize("kind", ["none", "standard", "full"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(28, 28), (32, 32), (9, 14), (40, 40), (64, 64), (96, 80)])
def test_fused_cuda_matches_the_reference_executor(kind: str, channels: int, size: tuple[int, int]) -> None:
    images = _images(256, size, channels).cuda()
    params = _params(kind, 256, size, channels, device="cuda")
    got = fused_cuda.apply_views(images, params)
    assert got.is_contiguous(memory_format=torch.channels_last)
    _assert_matches_reference(got, reference.apply_views(images, params), params)


@on_cuda
def test_fused_cuda_dtypes_layouts_and_resident_rows() -> None:
    data = _images(300, (32, 32), 3).cuda()
    rows = torch.randint(0, 300, (64,), device="cuda")
    params = _params("full", 64, (32, 32), 3, device="cuda")
    full = fused_cuda.apply_views(data[rows], params)
    assert torch.equal(fused_cuda.apply_views(data, params, rows=rows), full)
    assert torch.equal(fused_cuda.apply_views(data[rows].permute(0, 3, 1, 2).contiguous(), params), full)
    planar = torch.empty(64, 3, 32, 32, device="cuda")
    assert fused_cuda.apply_views(data[rows], params, planar) is planar
    torch.testing.assert_close(planar, full, atol=GEOMETRY_ATOL, rtol=0)  # another specialization: ulps differ
    for dtype in (torch.bfloat16, torch.float16):
        low = fused_cuda.apply_views(data[rows], params, dtype=dtype)
        assert low.dtype == dtype and (low.float() - full).abs().max() <= 2**-8
    cpu = fused_cpu.apply_views(data[rows].cpu(), _subset(params, slice(None), "cpu"))  # the fused ones agree too
    assert (cpu - full.cpu()).abs().max() <= PHOTOMETRIC_ATOL


@on_cuda
def test_fused_cuda_throughput_print() -> None:
    data = _images(50_000, (32, 32), 3).cuda()
    for views in (256, 65_536):
        rows = torch.randint(0, 50_000, (views,), device="cuda")
        params = _params("full", views, (32, 32), 3, device="cuda")
        out = torch.empty((views, 32, 32, 3), device="cuda").permute(0, 3, 1, 2)
        fused = _images_per_second(views, lambda r=rows, p=params, o=out: fused_cuda.apply_views(data, p, o, rows=r))
        slow = _images_per_second(views, lambda r=rows, p=params, o=out: reference.apply_views(data[r], p, o))
        sampler = _images_per_second(views, lambda n=views: _params("full", n, (32, 32), 3, device="cuda"))
        print(f"\n{torch.cuda.get_device_name()} 32px full, batch {views}: fused {fused:,.0f} img/s, "
              f"reference executor {slow:,.0f} img/s ({fused / slow:.1f}x); sampler {sampler:,.0f} views/s")


def _images_per_second(views: int, run, seconds: float = 0.5) -> float:
    run()
    torch.cuda.synchronize()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        reps += 1
    torch.cuda.synchronize()
    return views * reps / (time.perf_counter() - start)
