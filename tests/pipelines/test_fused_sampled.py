"""The in-kernel sampler (executors/fused_cuda_sampled.py) is the Python sampler's twin, bit for bit.

Parameters drawn in the Triton kernel equal `sample_view_params`' (same bits, floats compared as
integers) for many (seed, index, view id) keys, each kind the fused executor runs, and several image
sizes; the views it writes equal the fused executor run on the Python sampler's parameters, and the
torch reference executor within the contract's tolerances. On CPU both kernels run in Triton's
interpreter (a subprocess), and the CUDA code generation is checked from the compiled PTX (no FMA,
IEEE float64 division and square root). GPU tests are marked `gpu` and skipped without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from fastmem.pipelines import LoaderOptions
from fastmem.pipelines.backends.device import DeviceLoader
from fastmem.pipelines.executors import fused_cuda, fused_cuda_sampled, reference
from fastmem.pipelines.params import AugmentSpec, sample_view_params
from test_fused_executors import _assert_matches_reference, _images, _images_per_second, on_cuda

HERE = Path(__file__).resolve().parent  # this stage's tests; conftest one folder up

FIELDS = ("crop", "flip", "jitter", "factors", "order", "grayscale", "ra_ops", "ra_magnitudes")
KINDS = ("none", "standard", "full", "fullfixed:5:random")
SIZES = ((28, 28), (32, 32), (13, 9), (64, 64), (40, 5))  # (40, 5): most crop tries miss, the fallback runs
SEEDS = (0, 7, -3, 2**63 - 5, 2**64 - 1)


def _keys(count: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Sample indices (small, random, then near 2^63) and view ids (small, then past 2^32)."""
    gen = torch.Generator().manual_seed(count)
    big = torch.tensor([2**31 - 1, 2**31, 2**32 + 5, 2**40 + 3, 2**53 + 1, 2**62, 2**63 - 1])
    indices = torch.cat([torch.arange(count), torch.randint(0, 2**62, (count,), generator=gen), big])
    view_ids = torch.cat([torch.arange(len(indices) - 2) % 9, torch.tensor([2**33 + 1, 2**63 - 2])])
    return indices.to(device), view_ids.to(device)


def assert_same_bits(python, kernel) -> None:
    """Every field of two ViewParams holds the same dtype, shape and bits (floats compared as integers)."""
    for field in FIELDS:
        a, b = getattr(python, field), getattr(kernel, field).to(getattr(python, field).device)
        assert a.dtype == b.dtype and a.shape == b.shape, field
        if a.is_floating_point():
            a, b = a.view(torch.int32), b.view(torch.int32)
        mismatch = (a != b).reshape(len(a), -1).any(1).nonzero().flatten()
        assert not len(mismatch), f"{python.kind} {field} differs at views {mismatch[:5].tolist()}"


def _run_interpreted(script: str, timeout: int = 400) -> None:  # minutes when the machine is loaded
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE), str(HERE.parent)])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# ---- Triton's interpreter (CPU) ----
_PARAMS_CHECK = """
import torch
import triton
import triton.language as tl
from fastmem.pipelines import params
from fastmem.pipelines.executors import fused_cuda_sampled as fs
from test_fused_sampled import KINDS, SEEDS, SIZES, _keys, assert_same_bits
assert fs.INTERPRET
indices, view_ids = _keys(1500)
for kind in KINDS:
    spec = params.AugmentSpec.parse(kind)
    for size in SIZES:
        for seed in SEEDS:
            expected = params.sample_view_params(spec, seed, indices, view_ids, size, 3)
            assert_same_bits(expected, fs.sample_params(spec, seed, indices, view_ids, size, 3))
# The fallback box of (40, 5) images ran: centred, the image clipped to ratio 4/3.
fallback = params.sample_view_params(params.AugmentSpec.parse("full"), 0, indices, view_ids, (40, 5), 3).crop
assert ((fallback == torch.tensor([16, 0, 7, 5])).all(1)).sum() > len(indices) // 5

@triton.jit
def helpers(x, rounded, exp, f64, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    value = tl.load(x + i, mask=i < n)
    tl.store(rounded + i, fs._round_half_even(value), mask=i < n)
    tl.store(exp + i, fs._exp_small(value, f64), mask=i < n)

# Ties (rare in the random keys) round half to even, as torch.round; the Horner exp to the bit.
log_ratios = torch.empty(4000, dtype=torch.float64).uniform_(*params.LOG_RATIO, generator=torch.Generator().manual_seed(0))
x = torch.cat([torch.arange(-8, 80) * 0.5, torch.tensor([2.5 - 2**-51, 2.5 + 2**-51, 1e15 + 0.5]), log_ratios])
rounded, exp = torch.empty_like(x), torch.empty_like(x)
helpers[(1,)](x, rounded, exp, fs._tables(0, x.device)[1], len(x), BLOCK=4096)
assert torch.equal(rounded, torch.round(x))
assert torch.equal(exp.view(torch.int64), params._exp_small(x).view(torch.int64))
print("ok")
"""


@pytest.mark.skipif(not fused_cuda_sampled.AVAILABLE, reason="needs Triton")
def test_in_kernel_parameters_are_bit_identical_to_the_sampler_in_the_interpreter() -> None:
    _run_interpreted(_PARAMS_CHECK)


_VIEWS_CHECK = """
import torch
from fastmem.pipelines import LoaderOptions, params
from fastmem.pipelines.backends.device import DeviceLoader
from fastmem.pipelines.executors import fused_cuda, fused_cuda_sampled as fs, reference
from test_fused_executors import _assert_matches_reference, _images
from test_fused_sampled import _keys
keys = _keys(9)  # seed 12: among the last 6 and 12 keys some views are geometric only
cases = [("none", 3, (28, 28), 4), ("standard", 1, (13, 9), 12), ("standard", 3, (32, 32), 8),
         ("full", 3, (32, 32), 12), ("full", 1, (13, 9), 12), ("fullfixed:4", 3, (64, 64), 6)]  # 64 px: the executor's tile loop
for kind, channels, size, count in cases:
    spec, data = params.AugmentSpec.parse(kind), _images(40, size, channels)
    indices, view_ids = keys[0][-count:], keys[1][-count:]  # the last keys: big indices and view ids among them
    rows = torch.arange(count) * 7 % 40
    expected = params.sample_view_params(spec, 12, indices, view_ids, size, channels)
    got = fs.apply_sampled_views(data, spec, 12, indices, view_ids, rows=rows)
    assert torch.equal(got, fused_cuda.apply_views(data, expected, rows=rows)), kind  # the same view, drawn in-kernel
    _assert_matches_reference(got, reference.apply_views(data[rows], expected), expected)
    if kind == "full" and channels == 3:  # any output dtype and layout, as fused_cuda
        planar = torch.empty(count, channels, *size, dtype=torch.bfloat16)
        assert fs.apply_sampled_views(data, spec, 12, indices, view_ids, planar, rows=rows) is planar
        assert (planar.float() - got).abs().max() <= 2**-8  # Triton's bfloat16 rounding, as fused_cuda's
# The device backend's in-kernel path (taken on CUDA) yields the batches of the sample-then-execute path.
images, targets = _images(24, (12, 12), 3).numpy(), torch.arange(24) % 10
options = LoaderOptions(spec=params.AugmentSpec.parse("fullfixed:3:random"), batch_size=8, seed=4)
default, in_kernel = DeviceLoader(images, targets, options), DeviceLoader(images, targets, options)
assert not default.samples_in_kernel
in_kernel.samples_in_kernel = True  # as on CUDA
for loader in (default, in_kernel):
    loader.set_epoch(3)
for a, b in zip(default, in_kernel, strict=True):
    assert torch.equal(a.indices, b.indices) and torch.equal(a.view_ids, b.view_ids)
    assert torch.equal(a.targets, b.targets) and b.images.is_contiguous(memory_format=torch.channels_last)
    assert (a.images - b.images).abs().max() <= 2 / 255
print("ok")
"""


@pytest.mark.skipif(not fused_cuda_sampled.AVAILABLE, reason="needs Triton")
def test_in_kernel_views_match_the_executors_in_the_interpreter() -> None:
    _run_interpreted(_VIEWS_CHECK)


_PTX_CHECK = """
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastmem.pipelines.executors import fused_cuda_sampled as fs
tables = {"keys": "*i64", "f64": "*fp64", "f32": "*fp32", "orders": "*i64"}
sizes = {name: "i32" for name in ("height", "width", "fallback_h", "fallback_w")}
params = {"indices": "*i64", "view_ids": "*i64", "count": "i32", **tables, "crop": "*i64", "flip": "*u8",
          "jitter": "*u8", "factors": "*fp32", "order": "*i64", "gray": "*u8", **sizes, "KIND": "constexpr",
          "BLOCK": "constexpr"}
views = {"src": "*u8", "rows": "*i64", "indices": "*i64", "view_ids": "*i64", **tables, "out": "*fp32", **sizes,
         **{s: "i32" for s in ("sn", "sh", "sw", "sc", "on", "oc", "oh", "ow")}}
constants = dict(KIND=2, C=3, REFLECT=False, PHOTOMETRIC=True, BLOCK=1024, TILES=1, GR=0.2989, GG=0.587, GB=0.114)
views.update(dict.fromkeys(constants, "constexpr"))
for kernel, signature, constexprs in [(fs._sampled_params_kernel, params, {"KIND": 2, "BLOCK": 128}),
                                      (fs._sampled_views_kernel, views, constants)]:
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options={"enable_fp_fusion": False, "num_warps": 4})
    ptx = compiled.asm["ptx"]
    assert not re.search(r"\\bfma\\.", ptx), "an FMA contraction would round differently from the Python sampler"
    assert "div.rn.f64" in ptx and "sqrt.rn.f64" in ptx and not re.search(r"approx[.\\w]*f64", ptx)
print("ok")
"""


@pytest.mark.skipif(not fused_cuda_sampled.AVAILABLE, reason="needs Triton")
def test_in_kernel_sampler_compiles_without_fma_and_with_ieee_float64() -> None:
    pytest.importorskip("triton.backends.nvidia", reason="needs Triton's CUDA backend (compiles without a GPU)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run([sys.executable, "-c", _PTX_CHECK], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_the_device_backend_samples_in_kernel_only_where_the_fused_triton_executor_runs() -> None:
    images, targets = _images(8, (8, 8), 3).numpy(), torch.arange(8)
    for kind in ("full", "strength:0.5"):
        cpu = DeviceLoader(images, targets, LoaderOptions(spec=AugmentSpec.parse(kind), batch_size=4))
        assert not cpu.samples_in_kernel  # CPU: the sampler then the numba executor, unchanged
    assert not fused_cuda_sampled.supports(AugmentSpec.parse("strength:0.5"))
    with pytest.raises(ValueError, match="draws none, standard, full views"):
        fused_cuda_sampled.sample_params(AugmentSpec.parse("strength:0.5"), 0, torch.arange(2), 0, 32, 3)


# ---- CUDA ----
@on_cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", SIZES)
def test_cuda_in_kernel_parameters_are_bit_identical_to_the_sampler(kind: str, size: tuple[int, int]) -> None:
    spec = AugmentSpec.parse(kind)
    indices, view_ids = _keys(20_000, "cuda")
    for seed in SEEDS:
        kernel = fused_cuda_sampled.sample_params(spec, seed, indices, view_ids, size, 3)
        assert_same_bits(sample_view_params(spec, seed, indices.cpu(), view_ids.cpu(), size, 3), kernel)
        assert_same_bits(sample_view_params(spec, seed, indices, view_ids, size, 3), kernel)


VIEW_CASES = [(kind, 3, size) for kind in ("none", "standard", "full", "fullfixed:4")
              for size in ((28, 28), (32, 32), (13, 9), (64, 64))] + [("standard", 1, (13, 9)), ("full", 1, (32, 32))]


@on_cuda
@pytest.mark.parametrize(("kind", "channels", "size"), VIEW_CASES)
def test_cuda_in_kernel_views_match_the_executors(kind: str, channels: int, size: tuple[int, int]) -> None:
    spec, data = AugmentSpec.parse(kind), _images(500, size, channels).cuda()
    indices, view_ids = _keys(200, "cuda")
    rows = torch.randint(0, 500, (len(indices),), device="cuda")
    expected = sample_view_params(spec, 3, indices, view_ids, size, channels)
    got = fused_cuda_sampled.apply_sampled_views(data, spec, 3, indices, view_ids, rows=rows)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, fused_cuda.apply_views(data, expected, rows=rows), rtol=0, atol=1e-6)
    _assert_matches_reference(got, reference.apply_views(data[rows], expected), expected)


@on_cuda
def test_cuda_device_loader_samples_in_kernel() -> None:
    options = LoaderOptions(spec=AugmentSpec.parse("full"), batch_size=64, seed=2, device=torch.device("cuda"))
    loader = DeviceLoader(_images(256, (32, 32), 3).numpy(), torch.arange(256) % 10, options)
    assert loader.samples_in_kernel
    loader.set_epoch(5)
    for batch in loader:
        expected = sample_view_params(options.spec, 2, batch.indices, batch.view_ids, (32, 32), 3)
        torch.testing.assert_close(batch.images, fused_cuda.apply_views(loader.images, expected, rows=batch.indices),
                                   rtol=0, atol=1e-6)


@on_cuda
def test_cuda_in_kernel_sampling_throughput_print() -> None:
    spec, views, size = AugmentSpec.parse("full"), 65_536, (32, 32)
    data = _images(50_000, size, 3).cuda()
    indices = torch.randint(0, 50_000, (views,), device="cuda")
    out = torch.empty((views, 32, 32, 3), device="cuda").permute(0, 3, 1, 2)

    def sample_then_execute() -> None:
        fused_cuda.apply_views(data, sample_view_params(spec, 1, indices, 7, size, 3), out, rows=indices)

    def in_kernel() -> None:
        fused_cuda_sampled.apply_sampled_views(data, spec, 1, indices, 7, out, rows=indices)

    two_step, fused = _images_per_second(views, sample_then_execute), _images_per_second(views, in_kernel)
    params_only = _images_per_second(views, lambda: fused_cuda_sampled.sample_params(spec, 1, indices, 7, size, 3))
    print(f"\n{torch.cuda.get_device_name()} 32px full, batch {views}: in-kernel sampling {fused:,.0f} img/s, "
          f"sample-then-execute {two_step:,.0f} img/s ({fused / two_step:.2f}x); in-kernel sampler alone "
          f"{params_only:,.0f} views/s")

