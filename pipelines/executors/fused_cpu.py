"""Fused CPU executor: every view of a batch in one numba pass per image (the `device` backend on CPU).

Owns the numba kernels that execute `ViewParams` (params.py) on uint8 NHWC CPU tensors: crop-resize
(bilinear, align_corners=False) or reflect-translate, horizontal flip, colour jitter in the sampled
order, grayscale, written as float32 (or bf16 bits) into a preallocated NHWC buffer — i.e. NCHW in
channels_last memory. Semantics are those of the torch reference executor (reference.py); it draws
no randomness and never touches parameters. `OPS` lists the ops it implements: RandAugment
(`strength:A`) is not fused, so `supports()` declines it and executors/select.py falls back to the
reference executor.

How it is fast (FFCV style: state and allocation declared up front): per image, separable bilinear
tables (source element index and weight per output column, source rows and weights per output row)
are computed once; the horizontal pass runs only over the crop's source rows, the vertical pass is
a contiguous blend of two of those rows (vectorized), and the jitter ops run in place over the
image held in L1 (a 32×32×3 float image is 12 KiB). Hue is the exact HSV shift (branch-light: max,
min, chroma and the closed-form HSV→RGB), not an RGB rotation: the rotation differs from
torchvision's HSV hue by up to 84/255 for |h| ≤ 0.2, far outside the 2/255 contract.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from fastmem.pipelines.executors.reference import GRAY_WEIGHTS, to_nhwc
from numba import float32 as f32
from numba import njit, prange

OPS: frozenset[str] = frozenset({"pad_crop", "resized_crop", "flip", "color_jitter", "grayscale"})  # no RandAugment
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_VIEWS_PER_CHUNK = 8  # a thread's unit of work (its scratch buffers are allocated once per chunk)


def supports(params, images: torch.Tensor | None = None) -> bool:
    """True when this executor implements every op of `params` (on `images`, if given: uint8 on the CPU)."""
    if not set(params.ops) <= OPS:
        return False
    return images is None or (images.device.type == "cpu" and images.dtype == torch.uint8)


def apply_views(
    images_uint8: torch.Tensor,
    params,
    out: torch.Tensor | None = None,
    channels_last: bool = True,
    *,
    rows: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Execute `params` on uint8 (B,H,W,C) or (B,C,H,W) CPU images; returns (B, C, H, W) float in [0, 1], channels_last.

    `rows` (optional, int64) picks source image `rows[b]` of `images_uint8` for view b, so a resident
    dataset needs no per-batch gather copy. `out` (optional) is a preallocated (B, C, H, W) tensor
    whose memory is NHWC-contiguous (channels_last) of dtype float32, bfloat16 or float16; it is
    filled and returned. Without `out`, a new tensor of `dtype` is allocated.
    """
    missing = [op for op in params.ops if op not in OPS]
    if missing:
        raise ValueError(f"the fused CPU executor does not implement {', '.join(missing)} ({params.kind} views)")
    if images_uint8.device.type != "cpu":
        raise ValueError("the fused CPU executor runs on CPU tensors")
    src = to_nhwc(images_uint8, params.channels)  # no copy for a contiguous NHWC batch or dataset
    n_src, height, width, channels = src.shape
    views = len(params)
    if rows is None:
        if n_src != views:
            raise ValueError(f"{n_src} images for {views} views (pass rows= to read a resident dataset)")
        rows_np = np.arange(views, dtype=np.int64)
    else:
        rows_np = np.ascontiguousarray(rows.detach().cpu().numpy(), dtype=np.int64)
        if rows_np.shape != (views,) or (views and (rows_np.min() < 0 or rows_np.max() >= n_src)):
            raise ValueError("rows must hold one in-range source index per view")
    if (height, width) != tuple(params.image_size) or channels != params.channels:
        raise ValueError(f"images {tuple(src.shape)} do not match params for {params.image_size} x {params.channels}")
    if out is None:
        out = torch.empty((views, height, width, channels), dtype=dtype).permute(0, 3, 1, 2)
        _fill(src, rows_np, params, out)
        return out if channels_last else out.contiguous()
    _check_out(out, views, channels, height, width)
    if out.permute(0, 2, 3, 1).is_contiguous():
        _fill(src, rows_np, params, out)
    else:  # an NCHW-contiguous (or other) layout: compute NHWC, then copy once
        out.copy_(apply_views(src, params, rows=torch.from_numpy(rows_np)))
    return out


def _fill(src: torch.Tensor, rows: np.ndarray, params, out: torch.Tensor) -> None:
    """Run the kernel into `out`, a (B, C, H, W) tensor with NHWC-contiguous memory."""
    n_src, height, width, channels = src.shape
    views = len(rows)
    nhwc = out.permute(0, 2, 3, 1)
    if out.dtype == torch.float16:  # numba has no CPU half type: compute float32, let torch round once
        nhwc.copy_(apply_views(src, params, rows=torch.from_numpy(rows)).permute(0, 2, 3, 1))
        return
    src_np = src.numpy().reshape(n_src, height, width * channels)
    if out.dtype == torch.float32:
        floats, bits = nhwc.numpy().reshape(views, height * width * channels), _NO_BITS
    else:  # bfloat16: the kernel writes the bits, rounded to nearest even
        floats, bits = _NO_FLOATS, nhwc.view(torch.int16).numpy().view(np.uint16).reshape(views, -1)
    with numba.parallel_chunksize(1):  # threads claim chunks as they go: robust on a busy machine
        _run_views(src_np, rows, channels, *_plan(params), floats, bits, -(-views // _VIEWS_PER_CHUNK))


def _check_out(out: torch.Tensor, views: int, channels: int, height: int, width: int) -> None:
    if tuple(out.shape) != (views, channels, height, width):
        raise ValueError(f"out must have shape {(views, channels, height, width)}, got {tuple(out.shape)}")
    if out.dtype not in _OUT_DTYPES or out.device.type != "cpu":
        raise ValueError(f"out must be a CPU tensor of {', '.join(map(str, _OUT_DTYPES))}")


def _plan(params) -> tuple:
    """ViewParams → the kernel's flat numpy arrays (zero-copy where dtypes already match)."""
    def np_of(t: torch.Tensor, dt) -> np.ndarray:
        return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dt)

    return (np_of(params.crop, np.int64), "pad_crop" in params.ops, np_of(params.flip, np.bool_),
            np_of(params.jitter, np.bool_), np_of(params.factors, np.float32), np_of(params.order, np.int64),
            np_of(params.grayscale, np.bool_))


_NO_FLOATS = np.zeros((0, 0), np.float32)
_NO_BITS = np.zeros((0, 0), np.uint16)

_JIT = dict(fastmath=True, cache=True, nogil=True)
_GR, _GG, _GB = (np.float32(w) for w in GRAY_WEIGHTS)
_ZERO, _ONE = np.float32(0.0), np.float32(1.0)


@njit(**_JIT)
def _reflect(i, n):
    """numpy/torch 'reflect' padding index (edge not repeated); |offset| < n."""
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


@njit(cache=True, nogil=True)  # no fastmath: the tap positions must round exactly as torch's
def _axis_table(start, length, size, out_size, reflect, idx0, idx1, weight):
    """Source indices and weight of output positions 0..out_size-1 along one axis; True if any weight ≠ 0."""
    fractional = False
    if reflect:  # integer translation by `start` with reflect padding (standard aug)
        for j in range(out_size):
            k = _reflect(j + start, size)
            idx0[j] = k
            idx1[j] = k
            weight[j] = _ZERO
        return False
    scale = f32(length) / f32(out_size)  # torch's area_pixel_compute_scale (align_corners=False)
    for j in range(out_size):
        s = (f32(j) + f32(0.5)) * scale - f32(0.5)
        s = max(s, _ZERO)
        i0 = min(int(s), length - 1)
        i1 = i0 + 1 if i0 < length - 1 else i0
        w = s - f32(i0) if i1 != i0 else _ZERO
        idx0[j] = start + i0
        idx1[j] = start + i1
        weight[j] = w
        fractional |= w != _ZERO
    return fractional


@njit(**_JIT)
def _expand_columns(x0, x1, xw, flip, channels, out_w, ea, eb, ew):
    """Per output element (column × channel, after the flip): source element offsets and weight."""
    for j in range(out_w):
        k = out_w - 1 - j if flip else j
        for c in range(channels):
            e = k * channels + c
            ea[e] = x0[j] * channels + c
            eb[e] = x1[j] * channels + c
            ew[e] = xw[j]


@njit(**_JIT)
def _copy_rows(img, y0, ea, o, out_h, row_len):
    """Integer geometry (none, standard, unit-scale crops): o[i, e] = img[y0[i], ea[e]] / 255."""
    inv = f32(1.0 / 255.0)
    first = ea[0]
    contiguous = True  # unflipped, unshifted columns: a plain vectorized conversion per row
    for e in range(row_len):
        contiguous &= ea[e] == first + e
    for i in range(out_h):
        r = img[y0[i]]
        base = i * row_len
        dst = o[base:base + row_len]
        if contiguous:
            seg = r[first:first + row_len]
            for e in range(row_len):
                dst[e] = f32(seg[e]) * inv
        else:
            for e in range(row_len):
                dst[e] = f32(r[ea[e]]) * inv


@njit(**_JIT)
def _resize(img, y0, y1, yw, ea, eb, ew, hbuf, o, out_h, row_len):
    """Separable bilinear: horizontal pass over the needed source rows, then a vertical row blend."""
    first, last = y0[0], y1[out_h - 1]
    for r in range(first, last + 1):
        src_row = img[r]
        h = hbuf[r - first]
        for e in range(row_len):
            a = f32(src_row[ea[e]])
            h[e] = a + ew[e] * (f32(src_row[eb[e]]) - a)
    inv = f32(1.0 / 255.0)
    for i in range(out_h):
        w1 = yw[i]
        a = hbuf[y0[i] - first]
        b = hbuf[y1[i] - first]
        dst = o[i * row_len:(i + 1) * row_len]  # a slice: no index wraparound, so the loop vectorizes
        for e in range(row_len):
            dst[e] = (a[e] + w1 * (b[e] - a[e])) * inv


@njit(**_JIT)
def _brightness(o, f):
    for p in range(o.shape[0]):
        o[p] = min(max(o[p] * f, _ZERO), _ONE)


@njit(**_JIT)
def _gray_sum(o, channels):
    acc = _ZERO
    if channels == 3:
        for p in range(o.shape[0] // 3):
            acc += _GR * o[3 * p] + _GG * o[3 * p + 1] + _GB * o[3 * p + 2]
    else:
        for p in range(o.shape[0]):
            acc += o[p]
    return acc


@njit(**_JIT)
def _contrast(o, f, channels):
    pixels = o.shape[0] // channels
    mean = _gray_sum(o, channels) / f32(pixels)
    m = (_ONE - f) * mean
    for p in range(o.shape[0]):
        o[p] = min(max(f * o[p] + m, _ZERO), _ONE)


@njit(**_JIT)
def _saturation(o, f):
    g1 = _ONE - f
    for p in range(o.shape[0] // 3):
        r, g, b = o[3 * p], o[3 * p + 1], o[3 * p + 2]
        gray = (_GR * r + _GG * g + _GB * b) * g1
        o[3 * p] = min(max(f * r + gray, _ZERO), _ONE)
        o[3 * p + 1] = min(max(f * g + gray, _ZERO), _ONE)
        o[3 * p + 2] = min(max(f * b + gray, _ZERO), _ONE)


@njit(**_JIT)
def _hsv_channel(v, chroma, h6, n):
    """Closed-form HSV→RGB for channel offset n (5 R, 3 G, 1 B): v − chroma·clamp(min(k, 4−k), 0, 1)."""
    k = h6 + f32(n)
    k = k - f32(6.0) if k >= f32(6.0) else k
    return v - chroma * min(max(min(k, f32(4.0) - k), _ZERO), _ONE)


@njit(**_JIT)
def _hue(o, f):
    shift = f32(6.0) * f + f32(6.0)  # hue in sixths, kept positive (|f| ≤ 0.5)
    for p in range(o.shape[0] // 3):
        r, g, b = o[3 * p], o[3 * p + 1], o[3 * p + 2]
        v = max(r, max(g, b))
        chroma = v - min(r, min(g, b))
        inv = _ONE / (chroma if chroma > _ZERO else _ONE)
        h6 = f32(4.0) + (r - g) * inv  # max is blue
        if v == g:
            h6 = f32(2.0) + (b - r) * inv
        if v == r:
            h6 = (g - b) * inv
        h6 = h6 + shift  # in (-1 + 6 - 3, 5 + 6 + 3): fold into [0, 6)
        h6 = h6 - f32(6.0) * np.floor(h6 * f32(1.0 / 6.0))
        o[3 * p] = _hsv_channel(v, chroma, h6, 5)
        o[3 * p + 1] = _hsv_channel(v, chroma, h6, 3)
        o[3 * p + 2] = _hsv_channel(v, chroma, h6, 1)


@njit(**_JIT)
def _grayscale(o):
    for p in range(o.shape[0] // 3):
        gray = _GR * o[3 * p] + _GG * o[3 * p + 1] + _GB * o[3 * p + 2]
        o[3 * p] = gray
        o[3 * p + 1] = gray
        o[3 * p + 2] = gray


@njit(**_JIT)
def _to_bf16_bits(o, bits):
    """float32 → bfloat16 bits, round to nearest even (inputs are finite, in [0, 1])."""
    u = o.view(np.uint32)
    for p in range(o.shape[0]):
        x = u[p]
        bits[p] = np.uint16((x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


# No fastmath here: its function-wide attributes would also reach the inlined tap tables (a division
# turned into a reciprocal moves taps by an ulp); the inlined pixel loops keep their own fast flags.
@njit(parallel=True, cache=True, nogil=True)
def _run_views(src, rows, channels, crop, reflect, flip, jitter, factors, order, gray, out, out_bits, chunks):
    """Views [chunk) per thread, one pass per image: geometry into o, then jitter and grayscale in place."""
    views = rows.shape[0]
    height = src.shape[1]
    width = src.shape[2] // channels
    out_h, out_w = height, width  # the contract: output size == source size
    row_len = out_w * channels
    to_bits = out_bits.shape[0] > 0
    for chunk in prange(chunks):
        y0 = np.empty(out_h, np.int64)
        y1 = np.empty(out_h, np.int64)
        yw = np.empty(out_h, np.float32)
        x0 = np.empty(out_w, np.int64)
        x1 = np.empty(out_w, np.int64)
        xw = np.empty(out_w, np.float32)
        ea = np.empty(row_len, np.int64)
        eb = np.empty(row_len, np.int64)
        ew = np.empty(row_len, np.float32)
        hbuf = np.empty((height, row_len), np.float32)
        work = np.empty(out_h * row_len, np.float32)
        for v in range(chunk * views // chunks, (chunk + 1) * views // chunks):
            top, left, crop_h, crop_w = crop[v, 0], crop[v, 1], crop[v, 2], crop[v, 3]
            fy = _axis_table(top, crop_h, height, out_h, reflect, y0, y1, yw)
            fx = _axis_table(left, crop_w, width, out_w, reflect, x0, x1, xw)
            _expand_columns(x0, x1, xw, flip[v], channels, out_w, ea, eb, ew)
            o = work if to_bits else out[v]
            img = src[rows[v]]
            if fx or fy:
                _resize(img, y0, y1, yw, ea, eb, ew, hbuf, o, out_h, row_len)
            else:
                _copy_rows(img, y0, ea, o, out_h, row_len)
            if jitter[v]:
                for k in range(4):
                    op = order[v, k]
                    f = factors[v, op]
                    if op == 0:
                        _brightness(o, f)
                    elif op == 1:
                        _contrast(o, f, channels)
                    elif channels == 3 and op == 2:
                        _saturation(o, f)
                    elif channels == 3 and op == 3:
                        _hue(o, f)
            if gray[v] and channels == 3:
                _grayscale(o)
            if to_bits:
                _to_bf16_bits(o, out_bits[v])
