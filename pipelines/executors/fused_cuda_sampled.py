"""Fused CUDA executor that draws each view's parameters in the kernel: sampler and executor in one program.

Owns the Triton twin of `params.sample_view_params` for `none`, `standard` and `full` views (fixed-N
views only change the view id): the counter RNG (rng.py's splitmix64 on uint64: wrapping multiply,
logical shifts), uniforms from the top 24 bits, `_randint_u`, torchvision's 10-try RandomResizedCrop
search in float64 (the Horner exp, IEEE sqrt and division, round half to even built from floor),
flip, jitter flag, factors, op order and grayscale: the same ops in the same order, compiled without
FMA contraction, so the parameters are bit-identical to the Python sampler. The Python sampler stays
the definition; this is its executor-side twin, tested against it bit for bit
(tests/pipelines/test_fused_sampled.py): a change there is a change here. Each program draws its view's
parameters and hands them to fused_cuda.execute_view, so no ViewParams tensors exist;
`sample_params` runs the sampler alone and writes the parameters out (what the tests compare).
Contract: docs/augmentation_params.md.

Import-safe without CUDA or Triton (`AVAILABLE` is then False); with TRITON_INTERPRET=1 both kernels
run on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

import functools

import torch
from fastmem.pipelines.executors import fused_cuda
from fastmem.pipelines.params import (
    CROP_SCALE,
    EXP_TAYLOR,
    JITTER_HIGHS,
    JITTER_LOWS,
    JITTER_ORDERS,
    LOG_RATIO,
    P_FLIP,
    P_GRAY,
    P_JITTER,
    AugmentSpec,
    ViewParams,
    resized_crop_fallback,
)
from fastmem.pipelines.rng import (
    S_FACTORS,
    S_FLIP,
    S_GRAY,
    S_JITTER,
    S_LEFT,
    S_ORDER,
    S_RATIO,
    S_SCALE,
    S_TOP,
    stream_keys,
)

AVAILABLE, INTERPRET = fused_cuda.AVAILABLE, fused_cuda.INTERPRET
KINDS: dict[str, int] = {"none": 0, "standard": 1, "full": 2}  # the kinds sampled in-kernel (RandAugment is not fused)
PARAM_BLOCK = 4096 if INTERPRET else 128  # views per program of the parameter-only kernel (the interpreter pays per op)
_NUM_STREAMS = S_GRAY + 1  # streams 0..29: every draw of a full view


def supports(spec: AugmentSpec, images: torch.Tensor | None = None) -> bool:
    """True when views of `spec` can be drawn and executed in-kernel (on `images`, if given): Triton, CUDA."""
    return spec.kind in KINDS and fused_cuda.supports(spec, images)  # the executor's own test of ops and device


def apply_sampled_views(
    images_uint8: torch.Tensor,
    spec: AugmentSpec,
    seed: int,
    indices: torch.Tensor,
    view_ids: torch.Tensor | int,
    out: torch.Tensor | None = None,
    channels_last: bool = True,
    *,
    rows: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The views (seed, indices, view_ids) of `spec` on uint8 (N, H, W, C) CUDA images, parameters drawn in-kernel.

    Equals fused_cuda.apply_views(images, sample_view_params(spec, seed, indices, view_ids, (H, W), C)):
    `rows`, `out`, `channels_last` and `dtype` as there (rows default: image b for view b).
    """
    kind = _kind_code(spec)
    indices, view_ids = _keys(indices, view_ids)
    if images_uint8.dim() != 4:
        raise ValueError(f"expected uint8 images (N, H, W, C), got {tuple(images_uint8.shape)}")
    _, height, width, channels = images_uint8.shape
    src, rows, out = fused_cuda.launch_buffers(images_uint8, (height, width), channels, len(indices), out,
                                               channels_last, rows, dtype)
    views, device = out.shape[0], src.device
    if views == 0:
        return out
    fallback_h, fallback_w = resized_crop_fallback(height, width)
    _sampled_views_kernel[(views,)](
        src, rows, indices.to(device), view_ids.to(device), *_tables(seed, device), out,
        height, width, fallback_h, fallback_w, *src.stride(), *out.stride(),
        KIND=kind, C=channels, REFLECT=kind == KINDS["standard"], PHOTOMETRIC=kind == KINDS["full"],
        **fused_cuda.tile_constants(height, width),
        enable_fp_fusion=False,  # no FMA contraction: every sampled value rounds as the Python sampler's ops do
    )
    return out


def sample_params(
    spec: AugmentSpec, seed: int, indices: torch.Tensor, view_ids: torch.Tensor | int,
    image_size: int | tuple[int, int], channels: int,
) -> ViewParams:
    """The kernel's parameters, written out: bit-identical to sample_view_params with the same arguments."""
    kind = _kind_code(spec)
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    indices, view_ids = _keys(indices, view_ids)
    if not AVAILABLE or not (indices.is_cuda or INTERPRET):
        raise ValueError("the in-kernel sampler runs on CUDA tensors (or in Triton's interpreter)")
    device, views = indices.device, len(indices)
    crop = torch.empty((views, 4), dtype=torch.int64, device=device)
    flip, jitter, gray = (torch.empty(views, dtype=torch.uint8, device=device) for _ in range(3))
    factors = torch.empty((views, 4), dtype=torch.float32, device=device)
    order = torch.empty((views, 4), dtype=torch.int64, device=device)
    if views:
        fallback_h, fallback_w = resized_crop_fallback(height, width)
        _sampled_params_kernel[(triton.cdiv(views, PARAM_BLOCK),)](
            indices, view_ids.to(device), views, *_tables(seed, device), crop, flip, jitter, factors, order, gray,
            height, width, fallback_h, fallback_w, KIND=kind, BLOCK=PARAM_BLOCK, enable_fp_fusion=False,
        )
    no_ra = torch.zeros((views, 0), dtype=torch.int64, device=device)
    return ViewParams(spec.kind, (height, width), channels, crop, flip.bool(), jitter.bool(), factors, order,
                      gray.bool(), no_ra, no_ra.float())


def _kind_code(spec: AugmentSpec) -> int:
    if not AVAILABLE:
        raise RuntimeError("the in-kernel sampler needs Triton (it ships with CUDA builds of torch)")
    if spec.kind not in KINDS:
        raise ValueError(f"the in-kernel sampler draws {', '.join(KINDS)} views, not {spec}")
    return KINDS[spec.kind]


def _keys(indices: torch.Tensor, view_ids: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, view ids) as contiguous int64 of one length, as sample_view_params reads them."""
    indices = torch.as_tensor(indices, dtype=torch.int64).contiguous()
    view_ids = torch.as_tensor(view_ids, dtype=torch.int64, device=indices.device).expand(len(indices)).contiguous()
    return indices, view_ids


@functools.lru_cache(maxsize=32)
def _tables(seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's constants on `device`, built once: stream keys (int64), float64 and float32 constants, orders.

    float64 (as the sampler's float64 ops read them): EXP_TAYLOR, scale low, scale span, log-ratio
    low, log-ratio span. float32 (a Python scalar meets a float32 tensor in the sampler, so torch
    rounds it to float32 first): jitter lows, jitter spans, P_FLIP, P_JITTER, P_GRAY.
    """
    keys = stream_keys(seed, torch.arange(_NUM_STREAMS)).to(device)
    f64 = torch.tensor([*EXP_TAYLOR, CROP_SCALE[0], CROP_SCALE[1] - CROP_SCALE[0], LOG_RATIO[0],
                        LOG_RATIO[1] - LOG_RATIO[0]], dtype=torch.float64, device=device)
    spans = [hi - lo for lo, hi in zip(JITTER_LOWS, JITTER_HIGHS)]
    f32 = torch.tensor([*JITTER_LOWS, *spans, P_FLIP, P_JITTER, P_GRAY], dtype=torch.float32, device=device)
    orders = torch.tensor(JITTER_ORDERS, dtype=torch.int64, device=device).flatten()
    return keys, f64, f32, orders


if AVAILABLE:
    import triton
    import triton.language as tl
    from fastmem.pipelines.executors.fused_cuda import execute_view

    # Stream ids and table offsets, as constexprs (a jit function reads only constexpr globals).
    _S_SCALE, _S_RATIO = tl.constexpr(S_SCALE), tl.constexpr(S_RATIO)
    _S_TOP, _S_LEFT = tl.constexpr(S_TOP), tl.constexpr(S_LEFT)
    _S_FLIP, _S_JITTER, _S_FACTORS = tl.constexpr(S_FLIP), tl.constexpr(S_JITTER), tl.constexpr(S_FACTORS)
    _S_ORDER, _S_GRAY = tl.constexpr(S_ORDER), tl.constexpr(S_GRAY)
    _TAYLOR_TERMS = tl.constexpr(len(EXP_TAYLOR))  # float64 table: EXP_TAYLOR, then the four below
    _SCALE_LO, _SCALE_SPAN = tl.constexpr(len(EXP_TAYLOR)), tl.constexpr(len(EXP_TAYLOR) + 1)
    _RATIO_LO, _RATIO_SPAN = tl.constexpr(len(EXP_TAYLOR) + 2), tl.constexpr(len(EXP_TAYLOR) + 3)
    _SPANS, _P_FLIP, _P_JITTER, _P_GRAY = tl.constexpr(4), tl.constexpr(8), tl.constexpr(9), tl.constexpr(10)  # float32

    @triton.jit
    def _splitmix64(x):
        """rng._mix on uint64: add the golden gamma, then the finalizer (wrapping multiply, logical shifts)."""
        x = x + 0x9E3779B97F4A7C15
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB
        return x ^ (x >> 31)

    @triton.jit
    def _bits(keys, STREAM: tl.constexpr, index, view):
        """rng.counter_bits(seed, index, view, STREAM) as uint64: mix(mix(index + stream key) + view)."""
        key = tl.load(keys + STREAM).to(tl.uint64, bitcast=True)
        return _splitmix64(_splitmix64(index + key) + view)

    @triton.jit
    def _uniform(keys, STREAM: tl.constexpr, index, view):
        """rng.counter_uniform: the top 24 bits / 2^24 (float32, exact)."""
        return (_bits(keys, STREAM, index, view) >> 40).to(tl.float32) * 5.9604644775390625e-08

    @triton.jit
    def _randint_u(u, n):
        """params._randint_u: floor(u·n) in float64 (exact for 24-bit u), as int32."""
        return tl.floor(u.to(tl.float64) * n.to(tl.float64)).to(tl.int32)

    @triton.jit
    def _round_half_even(x):
        """torch.round on float64 (half to even) from floor: x - floor(x) is exact, so is every step."""
        down = tl.floor(x)
        rest = x - down
        odd = (down - 2.0 * tl.floor(down * 0.5)) == 1.0
        return tl.where((rest > 0.5) | ((rest == 0.5) & odd), down + 1.0, down)

    @triton.jit
    def _exp_small(x, f64):
        """params._exp_small: Horner over EXP_TAYLOR in float64, one rounding per multiply and per add."""
        acc = tl.load(f64) + x * 0.0  # the x^14 coefficient, shaped like x
        for n in tl.static_range(1, _TAYLOR_TERMS):
            acc = acc * x + tl.load(f64 + n)
        return acc

    @triton.jit
    def _resized_crop_box(keys, f64, index, view, height, width, fallback_h, fallback_w):
        """params._resized_crop_boxes for one view: 10 tries, the first that fits, else the centre fallback."""
        area = (height * width).to(tl.float64)
        scale_lo, scale_span = tl.load(f64 + _SCALE_LO), tl.load(f64 + _SCALE_SPAN)
        ratio_lo, ratio_span = tl.load(f64 + _RATIO_LO), tl.load(f64 + _RATIO_SPAN)
        for k in tl.static_range(10):  # last try first: the first try that fits is the last one written
            t = 9 - k
            scale = scale_lo + scale_span * _uniform(keys, _S_SCALE + t, index, view).to(tl.float64)
            ratio = _exp_small(ratio_lo + ratio_span * _uniform(keys, _S_RATIO + t, index, view).to(tl.float64), f64)
            target = area * scale
            w = _round_half_even(tl.sqrt(target * ratio)).to(tl.int32)  # float64 sqrt and / are IEEE (sqrt.rn, div.rn)
            h = _round_half_even(tl.sqrt(target / ratio)).to(tl.int32)
            fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
            if k == 0:
                found = fits
                crop_h = tl.where(fits, h, fallback_h)
                crop_w = tl.where(fits, w, fallback_w)
            else:
                found = found | fits
                crop_h = tl.where(fits, h, crop_h)
                crop_w = tl.where(fits, w, crop_w)
        top = _randint_u(_uniform(keys, _S_TOP, index, view), height - crop_h + 1)
        left = _randint_u(_uniform(keys, _S_LEFT, index, view), width - crop_w + 1)
        top = tl.where(found, top, (height - crop_h) // 2)
        left = tl.where(found, left, (width - crop_w) // 2)
        return top, left, crop_h, crop_w

    @triton.jit
    def _draw_view(index, view, keys, f64, f32, orders, height, width, fallback_h, fallback_w, KIND: tl.constexpr):
        """sample_view_params for one view (or a vector of views): box, flip, jitter, factors, ops, grayscale."""
        zero = tl.zeros_like(index).to(tl.int32)
        flip = zero != 0
        jitter = flip
        gray = flip
        one = zero.to(tl.float32) + 1.0
        factors = (one, one, one, one * 0.0)
        ops = (zero, zero + 1, zero + 2, zero + 3)  # JITTER_ORDERS[0]
        box = (zero, zero, zero + height, zero + width)
        if KIND == 1:  # standard: a reflect-padded translation by up to H//8 per axis, flip
            pad = height // 8
            box = (_randint_u(_uniform(keys, _S_TOP, index, view), 2 * pad + 1) - pad,
                   _randint_u(_uniform(keys, _S_LEFT, index, view), 2 * pad + 1) - pad, zero + height, zero + width)
            flip = _uniform(keys, _S_FLIP, index, view) < tl.load(f32 + _P_FLIP)
        if KIND == 2:  # full: resized crop, flip, jitter (factors, order), grayscale
            box = _resized_crop_box(keys, f64, index, view, height, width, fallback_h, fallback_w)
            flip = _uniform(keys, _S_FLIP, index, view) < tl.load(f32 + _P_FLIP)
            jitter = _uniform(keys, _S_JITTER, index, view) < tl.load(f32 + _P_JITTER)
            factors = (tl.load(f32) + tl.load(f32 + _SPANS) * _uniform(keys, _S_FACTORS, index, view),
                       tl.load(f32 + 1) + tl.load(f32 + _SPANS + 1) * _uniform(keys, _S_FACTORS + 1, index, view),
                       tl.load(f32 + 2) + tl.load(f32 + _SPANS + 2) * _uniform(keys, _S_FACTORS + 2, index, view),
                       tl.load(f32 + 3) + tl.load(f32 + _SPANS + 3) * _uniform(keys, _S_FACTORS + 3, index, view))
            row = ((_bits(keys, _S_ORDER, index, view) >> 1) % 24).to(tl.int32) * 4  # JITTER_ORDERS[bits>>1 mod 24]
            ops = (tl.load(orders + row).to(tl.int32), tl.load(orders + row + 1).to(tl.int32),
                   tl.load(orders + row + 2).to(tl.int32), tl.load(orders + row + 3).to(tl.int32))
            gray = _uniform(keys, _S_GRAY, index, view) < tl.load(f32 + _P_GRAY)
        return box, flip, jitter, factors, ops, gray

    @triton.jit
    def _sampled_views_kernel(src, rows, indices, view_ids, keys, f64, f32, orders, out,
                              height, width, fallback_h, fallback_w, sn, sh, sw, sc, on, oc, oh, ow,
                              KIND: tl.constexpr, C: tl.constexpr, REFLECT: tl.constexpr, PHOTOMETRIC: tl.constexpr,
                              BLOCK: tl.constexpr, TILES: tl.constexpr,
                              GR: tl.constexpr, GG: tl.constexpr, GB: tl.constexpr):
        """One program per view: draw view v's parameters, then execute it (fused_cuda.execute_view)."""
        v = tl.program_id(0).to(tl.int64)
        index = tl.load(indices + v).to(tl.uint64, bitcast=True)
        view = tl.load(view_ids + v).to(tl.uint64, bitcast=True)
        box, flip, jitter, factors, ops, gray = _draw_view(index, view, keys, f64, f32, orders, height, width,
                                                           fallback_h, fallback_w, KIND)
        execute_view(src, tl.load(rows + v), box, flip, jitter, factors, ops, gray, out + v * on,
                     height, width, sn, sh, sw, sc, oc, oh, ow, C, REFLECT, PHOTOMETRIC, BLOCK, TILES, GR, GG, GB)

    @triton.jit
    def _sampled_params_kernel(indices, view_ids, count, keys, f64, f32, orders,
                               crop, flip, jitter, factors, order, gray,
                               height, width, fallback_h, fallback_w, KIND: tl.constexpr, BLOCK: tl.constexpr):
        """BLOCK views per program: draw their parameters (the same _draw_view) and write them out."""
        v = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = v < count
        index = tl.load(indices + v, mask=mask, other=0).to(tl.uint64, bitcast=True)
        view = tl.load(view_ids + v, mask=mask, other=0).to(tl.uint64, bitcast=True)
        box, flipped, jittered, view_factors, ops, grayed = _draw_view(index, view, keys, f64, f32, orders, height,
                                                                       width, fallback_h, fallback_w, KIND)
        for k in tl.static_range(4):
            tl.store(crop + 4 * v + k, box[k].to(tl.int64), mask=mask)
            tl.store(factors + 4 * v + k, view_factors[k], mask=mask)
            tl.store(order + 4 * v + k, ops[k].to(tl.int64), mask=mask)
        tl.store(flip + v, flipped.to(tl.uint8), mask=mask)
        tl.store(jitter + v, jittered.to(tl.uint8), mask=mask)
        tl.store(gray + v, grayed.to(tl.uint8), mask=mask)
