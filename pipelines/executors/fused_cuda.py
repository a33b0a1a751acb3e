"""Fused CUDA executor: every view of a batch in one Triton kernel launch (the `device` backend on GPU).

Owns the Triton kernel that executes `ViewParams` (params.py) on uint8 CUDA images: one program per
view, one lane per output pixel, all channels in registers: crop-resize (bilinear, align_corners=False)
or reflect-translate with the flip folded into the source index, colour jitter in the view's own
order, grayscale, one store per channel in the output's dtype and strides (channels_last or not).
Contrast needs the mean luma of the image *as it stands before contrast*: views whose jitter
includes it run a first sweep over their tiles up to that op (a block reduction), then the full
sweep. Semantics are those of the torch reference executor (reference.py), photometric ops within
2/255 (hue is the closed-form HSV shift); the geometry rounds as the reference's ops do (IEEE division,
no FMA contraction), so it stays within 1e-5 at any image size. It draws no randomness (its twin
fused_cuda_sampled.py draws the parameters in the same program and shares `execute_view`, the
per-view body). `OPS` lists the ops it implements:
RandAugment is not fused, so `supports()` declines it and executors/select.py falls back to the
reference executor.

Import-safe without CUDA or Triton (`AVAILABLE` is then False). With TRITON_INTERPRET=1 the same
kernel runs on CPU tensors through Triton's interpreter (how the CPU tests check its semantics).
"""

from __future__ import annotations

import os

import torch
from fastmem.pipelines.executors.reference import GRAY_WEIGHTS

try:  # Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AVAILABLE = triton is not None
OPS: frozenset[str] = frozenset({"pad_crop", "resized_crop", "flip", "color_jitter", "grayscale"})  # no RandAugment
MAX_BLOCK = 1024  # pixels per tile (registers per lane stay small); larger images loop over tiles
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(params, images: torch.Tensor | None = None) -> bool:
    """True when this executor implements every op of `params` (ViewParams or AugmentSpec: its `.ops`) on `images`, if
    given: Triton, a CUDA tensor (or the interpreter)."""
    if not AVAILABLE or not set(params.ops) <= OPS:
        return False
    if images is None:
        return torch.cuda.is_available() or INTERPRET
    return images.dtype == torch.uint8 and (images.is_cuda or INTERPRET)


def apply_views(
    images_uint8: torch.Tensor,
    params,
    out: torch.Tensor | None = None,
    channels_last: bool = True,
    *,
    rows: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Execute `params` on uint8 (B,H,W,C) or (B,C,H,W) CUDA images; (B, C, H, W) float in [0, 1].

    `rows` (optional, int64 on the images' device) picks source image `rows[b]` for view b, so a
    resident dataset needs no gather copy. `out` (optional) is any (B, C, H, W) tensor of float32,
    bfloat16 or float16 on the images' device (strides are honoured, so channels_last or not);
    without it a new tensor of `dtype` is allocated, channels_last when `channels_last`.
    """
    if not AVAILABLE:
        raise RuntimeError("the fused CUDA executor needs Triton (it ships with CUDA builds of torch)")
    missing = [op for op in params.ops if op not in OPS]
    if missing:
        raise ValueError(f"the fused CUDA executor does not implement {', '.join(missing)} ({params.kind} views)")
    src, rows, out = launch_buffers(images_uint8, tuple(params.image_size), params.channels, len(params), out,
                                    channels_last, rows, dtype)
    views, (height, width, channels), device = out.shape[0], src.shape[1:], src.device
    if views == 0:
        return out
    _views_kernel[(views,)](
        src, rows, params.crop.to(device=device, dtype=torch.int64).contiguous(),
        _as_u8(params.flip.to(device)), _as_u8(params.jitter.to(device)),
        params.factors.to(device=device, dtype=torch.float32).contiguous(),
        params.order.to(device=device, dtype=torch.int64).contiguous(),
        _as_u8(params.grayscale.to(device)), out,
        height, width, *src.stride(), *out.stride(),
        C=channels, REFLECT="pad_crop" in params.ops, PHOTOMETRIC="color_jitter" in params.ops,
        **tile_constants(height, width),
        enable_fp_fusion=False,  # no FMA contraction: the geometry rounds as the reference executor's ops do
    )
    return out


def launch_buffers(
    images_uint8: torch.Tensor, image_size: tuple[int, int], channels: int, views: int, out: torch.Tensor | None,
    channels_last: bool, rows: torch.Tensor | None, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The checked launch inputs of `views` views: (the images as NHWC, int64 rows, the output tensor)."""
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError(f"expected a uint8 batch of 4 dims, got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    if not (images_uint8.is_cuda or INTERPRET):
        raise ValueError("the fused CUDA executor runs on CUDA tensors")
    src = images_uint8
    if src.shape[-1] != channels and src.shape[1] == channels:  # NCHW given: a strided NHWC view, no copy
        src = src.permute(0, 2, 3, 1)
    n_src, height, width, c = src.shape
    if c != channels or (height, width) != tuple(image_size):
        raise ValueError(f"images {tuple(src.shape)} do not match params for {tuple(image_size)} x {channels}")
    device = src.device
    if rows is None:
        if n_src != views:
            raise ValueError(f"{n_src} images for {views} views (pass rows= to read a resident dataset)")
        rows = torch.arange(views, device=device)
    rows = rows.to(device=device, dtype=torch.int64)
    if out is None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((views, channels, height, width), dtype=dtype, device=device, memory_format=fmt)
    if tuple(out.shape) != (views, channels, height, width) or out.dtype not in _OUT_DTYPES or out.device != device:
        raise ValueError(f"out must be a {(views, channels, height, width)} float32/bf16/fp16 tensor on {device}")
    return src, rows, out


def tile_constants(height: int, width: int) -> dict[str, object]:
    """The launch's tiling: BLOCK pixels per tile, TILES tiles per view, the warps, the luma weights."""
    pixels = height * width
    block = min(triton.next_power_of_2(pixels), MAX_BLOCK)
    return {"BLOCK": block, "TILES": triton.cdiv(pixels, block), "GR": GRAY_WEIGHTS[0], "GG": GRAY_WEIGHTS[1],
            "GB": GRAY_WEIGHTS[2], "num_warps": 4 if block >= 512 else 2}


def _as_u8(flags: torch.Tensor) -> torch.Tensor:
    """bool → uint8 without a copy (Triton reads bytes)."""
    flags = flags.contiguous()
    return flags.view(torch.uint8) if flags.dtype == torch.bool else flags.to(torch.uint8)


if AVAILABLE:

    @triton.jit
    def _axis(pos, start, length, size, REFLECT: tl.constexpr):
        """Source taps (i0, i1) and weight of i1 for output positions `pos`, as executor._axis_taps."""
        if REFLECT:  # integer translation with reflect padding (length == size, weight 0)
            i0 = pos + start
            i0 = tl.where(i0 < 0, -i0, i0)
            i0 = tl.where(i0 >= size, 2 * (size - 1) - i0, i0)
            i1 = i0
            frac = tl.zeros(pos.shape, tl.float32)
        else:
            # IEEE division (Triton's `/` is approximate: 2 ulp of the scale grew to > 1e-5 of a pixel at 40 px).
            scale = tl.math.div_rn(length.to(tl.float32), size.to(tl.float32))
            s = tl.maximum((pos.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
            f0 = tl.floor(s)
            frac = s - f0
            i0 = f0.to(tl.int32)
            i1 = tl.minimum(i0 + 1, length - 1) + start
            i0 = i0 + start
        return i0, i1, frac

    @triton.jit
    def _bilinear(base, y0, y1, fy, x0, x1, fx, sh, sw, mask):
        """One channel (at `base`) of the bilinear sample (vertical first, as the reference), in [0, 1]."""
        p00 = tl.load(base + y0 * sh + x0 * sw, mask=mask, other=0).to(tl.float32)
        p01 = tl.load(base + y0 * sh + x1 * sw, mask=mask, other=0).to(tl.float32)
        p10 = tl.load(base + y1 * sh + x0 * sw, mask=mask, other=0).to(tl.float32)
        p11 = tl.load(base + y1 * sh + x1 * sw, mask=mask, other=0).to(tl.float32)
        left = p00 * (1.0 - fy) + p10 * fy
        right = p01 * (1.0 - fy) + p11 * fy
        blended = left * (1.0 - fx) + right * fx
        return tl.math.div_rn(blended, tl.full(blended.shape, 255.0, tl.float32))

    @triton.jit
    def _unit(x):
        return tl.minimum(tl.maximum(x, 0.0), 1.0)

    @triton.jit
    def _hsv_channel(v, chroma, h6, n: tl.constexpr):
        """Closed-form HSV→RGB for channel offset n (5 R, 3 G, 1 B)."""
        k = h6 + n
        k = tl.where(k >= 6.0, k - 6.0, k)
        return v - chroma * tl.minimum(tl.maximum(tl.minimum(k, 4.0 - k), 0.0), 1.0)

    @triton.jit
    def _hue(r, g, b, f):
        v = tl.maximum(tl.maximum(r, g), b)
        chroma = v - tl.minimum(tl.minimum(r, g), b)
        inv = 1.0 / tl.where(chroma > 0.0, chroma, 1.0)
        h6 = tl.where(v == r, (g - b) * inv, tl.where(v == g, 2.0 + (b - r) * inv, 4.0 + (r - g) * inv))
        h6 = h6 + (6.0 * f + 6.0)
        h6 = h6 - 6.0 * tl.floor(h6 * (1.0 / 6.0))
        return _hsv_channel(v, chroma, h6, 5), _hsv_channel(v, chroma, h6, 3), _hsv_channel(v, chroma, h6, 1)

    @triton.jit
    def _apply_op(r, g, b, op, factors, mean, C: tl.constexpr, GR: tl.constexpr, GG: tl.constexpr, GB: tl.constexpr):
        """Jitter op `op` (0 brightness, 1 contrast around `mean`, 2 saturation, 3 hue) with its factor of `factors`."""
        if op == 0:
            f = factors[0]
            r = _unit(r * f)
            if C == 3:
                g = _unit(g * f)
                b = _unit(b * f)
        elif op == 1:
            f = factors[1]
            m = mean * (1.0 - f)
            r = _unit(r * f + m)
            if C == 3:
                g = _unit(g * f + m)
                b = _unit(b * f + m)
        elif op == 2:
            if C == 3:
                f = factors[2]
                gray = (r * GR + g * GG + b * GB) * (1.0 - f)
                r = _unit(r * f + gray)
                g = _unit(g * f + gray)
                b = _unit(b * f + gray)
        else:
            if C == 3:
                r, g, b = _hue(r, g, b, factors[3])
        return r, g, b

    @triton.jit
    def _sample(src, row, sn, sh, sw, sc, height, width, top, left, crop_h, crop_w, flip, p, mask,
                C: tl.constexpr, REFLECT: tl.constexpr):
        """The view's geometry at output pixels p: channels (r, g, b) in [0, 1] (g = b = r for C = 1)."""
        i = p // width
        j = p % width
        j = tl.where(flip, width - 1 - j, j)
        y0, y1, fy = _axis(i, top, crop_h, height, REFLECT)
        x0, x1, fx = _axis(j, left, crop_w, width, REFLECT)
        base = src + row * sn
        r = _bilinear(base, y0, y1, fy, x0, x1, fx, sh, sw, mask)
        if C == 3:
            g = _bilinear(base + sc, y0, y1, fy, x0, x1, fx, sh, sw, mask)
            b = _bilinear(base + 2 * sc, y0, y1, fy, x0, x1, fx, sh, sw, mask)
        else:
            g = r
            b = r
        return r, g, b

    @triton.jit
    def execute_view(src, row, box, flipped, jit, factors, ops, to_gray, dst_view,
                     height, width, sn, sh, sw, sc, oc, oh, ow,
                     C: tl.constexpr, REFLECT: tl.constexpr, PHOTOMETRIC: tl.constexpr, BLOCK: tl.constexpr,
                     TILES: tl.constexpr, GR: tl.constexpr, GG: tl.constexpr, GB: tl.constexpr):
        """Write one view of source image `row` at `dst_view`: geometry, then (when PHOTOMETRIC) jitter and gray.

        box = (top, left, crop height, crop width); factors = (brightness, contrast, saturation, hue);
        ops = the jitter op at each position. Shared by every kernel that executes views (this module's,
        and fused_cuda_sampled's, which draws the parameters in the same program).
        """
        top, left, crop_h, crop_w = box
        pixels = height * width
        lanes = tl.arange(0, BLOCK)
        mean = 0.0
        if PHOTOMETRIC:
            # Contrast blends with the mean luma of the image as it stands when contrast runs.
            where_contrast = ((ops[1] == 1).to(tl.int32) + 2 * (ops[2] == 1).to(tl.int32)
                              + 3 * (ops[3] == 1).to(tl.int32))
            if jit:
                acc = 0.0
                for t in range(TILES):  # a loop, not unrolled: large images have many tiles
                    p = t * BLOCK + lanes
                    mask = p < pixels
                    r, g, b = _sample(src, row, sn, sh, sw, sc, height, width, top, left, crop_h, crop_w, flipped, p,
                                      mask, C, REFLECT)
                    for k in tl.static_range(3):
                        if k < where_contrast:
                            r, g, b = _apply_op(r, g, b, ops[k], factors, 0.0, C, GR, GG, GB)
                    luma = r
                    if C == 3:
                        luma = r * GR + g * GG + b * GB
                    acc += tl.sum(tl.where(mask, luma, 0.0), axis=0)
                mean = acc / pixels
        for t in range(TILES):  # a loop, not unrolled: large images have many tiles
            p = t * BLOCK + lanes
            mask = p < pixels
            r, g, b = _sample(src, row, sn, sh, sw, sc, height, width, top, left, crop_h, crop_w, flipped, p, mask,
                              C, REFLECT)
            if PHOTOMETRIC:
                if jit:
                    for k in tl.static_range(4):
                        r, g, b = _apply_op(r, g, b, ops[k], factors, mean, C, GR, GG, GB)
                if C == 3:
                    if to_gray:
                        luma = r * GR + g * GG + b * GB
                        r = luma
                        g = luma
                        b = luma
            dst = dst_view + (p // width) * oh + (p % width) * ow
            tl.store(dst, r.to(dst_view.dtype.element_ty), mask=mask)
            if C == 3:
                tl.store(dst + oc, g.to(dst_view.dtype.element_ty), mask=mask)
                tl.store(dst + 2 * oc, b.to(dst_view.dtype.element_ty), mask=mask)

    @triton.jit
    def _views_kernel(src, rows, crop, flip, jitter, factors, order, gray, out,
                      height, width, sn, sh, sw, sc, on, oc, oh, ow,
                      C: tl.constexpr, REFLECT: tl.constexpr, PHOTOMETRIC: tl.constexpr, BLOCK: tl.constexpr,
                      TILES: tl.constexpr, GR: tl.constexpr, GG: tl.constexpr, GB: tl.constexpr):
        """One program per view: read view v's parameters from the `ViewParams` tensors, then execute it."""
        v = tl.program_id(0).to(tl.int64)
        box = (tl.load(crop + 4 * v).to(tl.int32), tl.load(crop + 4 * v + 1).to(tl.int32),
               tl.load(crop + 4 * v + 2).to(tl.int32), tl.load(crop + 4 * v + 3).to(tl.int32))
        view_factors = (tl.load(factors + 4 * v), tl.load(factors + 4 * v + 1), tl.load(factors + 4 * v + 2),
                        tl.load(factors + 4 * v + 3))
        ops = (tl.load(order + 4 * v).to(tl.int32), tl.load(order + 4 * v + 1).to(tl.int32),
               tl.load(order + 4 * v + 2).to(tl.int32), tl.load(order + 4 * v + 3).to(tl.int32))
        execute_view(src, tl.load(rows + v), box, tl.load(flip + v) != 0, tl.load(jitter + v) != 0, view_factors, ops,
                     tl.load(gray + v) != 0, out + v * on, height, width, sn, sh, sw, sc, oc, oh, ow,
                     C, REFLECT, PHOTOMETRIC, BLOCK, TILES, GR, GG, GB)
