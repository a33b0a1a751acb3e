"""The torch reference executor: turns a batch of uint8 images plus `ViewParams` into float views.

Owns the pixel semantics of docs/augmentation_params.md as whole-batch tensor ops (no per-sample
Python): crop + bilinear resize by gathers, flip, colour jitter in each view's own op order,
grayscale, and RandAugment (grouped by op, executed with torchvision's own kernels). The `torch`
baseline runs the same code on batches of one, so its views equal the device pipeline's; the fused
executors are tested against this one. It implements every op of params.AUGMENT_OPS (`OPS`).
Geometry and jitter use only elementwise IEEE ops (no fused multiply-adds, no batch-size dependent
reductions except one float64 mean), so a view's pixels do not depend on which batch it was
computed in. It must not draw randomness (params.py does).
"""

from __future__ import annotations

import math

import torch
from fastmem.pipelines.params import RA_OPS, ViewParams

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
# Every op of params.AUGMENT_OPS: the reference defines their pixels (executors/select.py falls back to it).
OPS: frozenset[str] = frozenset({"pad_crop", "resized_crop", "flip", "color_jitter", "grayscale", "randaugment"})


def supports(params: ViewParams, images: torch.Tensor | None = None) -> bool:
    """True when this executor implements every op of `params` (on any device; `apply_views` checks the images)."""
    return set(params.ops) <= OPS


def apply_views(
    images: torch.Tensor, params: ViewParams, out: torch.Tensor | None = None, channels_last: bool = True,
    *, rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Execute `params` on uint8 images (B,H,W,C) or (B,C,H,W) (or on `images[rows]`); float (B,C,H,W) in [0, 1], into `out` if given."""
    missing = [op for op in params.ops if op not in OPS]
    if missing:
        raise ValueError(f"the reference executor does not implement {', '.join(missing)} ({params.kind} views)")
    nhwc = to_nhwc(images if rows is None else images[rows], params.channels)
    b, h, w, c = nhwc.shape
    if (h, w) != params.image_size or b != len(params):
        raise ValueError(f"images {tuple(nhwc.shape)} do not match params for {len(params)} views of {params.image_size}")
    ops = params.ops
    if "randaugment" in ops:
        # clone: ops run in place, and for 1 channel .contiguous() would return the caller's own images
        planar = _randaugment(nhwc.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format), params)
        planar = planar.float() / 255.0
    elif not ops:
        planar = nhwc.permute(0, 3, 1, 2).float() / 255.0
    else:  # a crop box (pad_crop: reflect-padded offsets; resized_crop) resized to H×W, then the flip
        planar = _crop_resize_flip(nhwc, params)
        # Skipping a stage no view uses changes no pixel (its ops are exact identities) and saves a batch of one most ops.
        if "color_jitter" in ops and bool(params.jitter.any()):
            planar = _color_jitter(planar, params)
        if "grayscale" in ops and c == 3 and bool(params.grayscale.any()):
            planar = torch.where(params.grayscale.view(b, 1, 1, 1), _gray(planar).expand(b, 3, h, w), planar)
    if out is None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((b, c, h, w), dtype=torch.float32, device=nhwc.device, memory_format=fmt)
    return out.copy_(planar)


def to_nhwc(images: torch.Tensor, channels: int) -> torch.Tensor:
    """A contiguous (B,H,W,C) view of a uint8 batch given as NHWC or NCHW (NHWC wins when ambiguous)."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected a uint8 batch of 4 dims, got {images.dtype} {tuple(images.shape)}")
    if images.shape[-1] != channels and images.shape[1] == channels:
        images = images.permute(0, 2, 3, 1)
    return images.contiguous()


# ---- geometry ----
def _axis_taps(start: torch.Tensor, length: torch.Tensor, size: int, flip: torch.Tensor | None):
    """Source indices (i0, i1) and weight of i1 along one axis, as torch's bilinear, align_corners=False."""
    scale = length.float() / size  # torch's area_pixel_compute_scale (float)
    pos = torch.arange(size, device=start.device, dtype=torch.float32) + 0.5
    src = (pos * scale.unsqueeze(1) - 0.5).clamp_min(0.0)
    i0 = src.floor()
    frac = src - i0
    i0 = i0.long()
    i1 = torch.minimum(i0 + 1, length.unsqueeze(1) - 1)
    if flip is not None:
        f = flip.unsqueeze(1)
        i0, i1, frac = torch.where(f, i0.flip(1), i0), torch.where(f, i1.flip(1), i1), torch.where(f, frac.flip(1), frac)
    return _reflect(i0 + start.unsqueeze(1), size), _reflect(i1 + start.unsqueeze(1), size), frac


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Mirror out-of-range indices (torch 'reflect' padding: no edge repeat); a no-op for in-image crops."""
    index = torch.where(index < 0, -index, index)
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def _crop_resize_flip(nhwc: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """Crop each view's box, resize it bilinearly to H×W, flip: float (B,C,H,W) in [0, 1]."""
    b, h, w, c = nhwc.shape
    crop = params.crop
    y0, y1, fy = _axis_taps(crop[:, 0], crop[:, 2], h, None)
    x0, x1, fx = _axis_taps(crop[:, 1], crop[:, 3], w, params.flip)
    base = (torch.arange(b, device=nhwc.device) * h).unsqueeze(1)
    rows = nhwc.view(b * h, w * c)
    top = rows.index_select(0, (base + y0).flatten()).view(b, h, w, c).float()
    bottom = rows.index_select(0, (base + y1).flatten()).view(b, h, w, c).float()
    fy = fy.view(b, h, 1, 1)
    # torch's bilinear: (1 - λ)·a + λ·b along each axis, vertical first.
    vertical = top * (1.0 - fy) + bottom * fy  # (B, H, W_src, C)
    planar = vertical.permute(0, 3, 1, 2)  # (B, C, H, W_src) view
    left = planar.gather(3, x0.view(b, 1, 1, w).expand(b, c, h, w))
    right = planar.gather(3, x1.view(b, 1, 1, w).expand(b, c, h, w))
    fx = fx.view(b, 1, 1, w)
    return (left * (1.0 - fx) + right * fx) / 255.0


# ---- colour ----
def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma (B,1,H,W) of (B,C,H,W) float images, a new tensor (1-channel images are their own luma)."""
    if x.shape[1] == 1:
        return x.clone()
    gray = x[:, 0:1] * GRAY_WEIGHTS[0]
    gray += x[:, 1:2] * GRAY_WEIGHTS[1]
    gray += x[:, 2:3] * GRAY_WEIGHTS[2]
    return gray


def _color_jitter(x: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """Brightness, contrast, saturation and hue in each view's order, as 4 rounds over order positions (in place)."""
    b, c = x.shape[:2]
    colour = c == 3
    shape = (b, 1, 1, 1)
    for k in range(4):
        op = torch.where(params.jitter, params.order[:, k], -1)  # -1: nothing at this position
        # Brightness, contrast and saturation are one blend x·r + ref·(1 - r) with a per-view reference
        # (0, the mean luma, the luma image); ratio 1 and weight 0 leave x exactly as it is.
        is_contrast, is_saturation = op == 1, (op == 2) & colour
        blends = (op == 0) | is_contrast | is_saturation
        ratio = torch.where(blends, params.factors.gather(1, op.clamp(min=0).unsqueeze(1)).squeeze(1), 1.0)
        gray = _gray(x)
        mean = (gray.sum(dim=(1, 2, 3), dtype=torch.float64) / gray[0].numel()).float()
        ref_constant = torch.where(is_contrast, mean * (1.0 - ratio), 0.0).view(shape)
        ref = gray.mul_(torch.where(is_saturation, 1.0 - ratio, 0.0).view(shape)).add_(ref_constant)
        x.mul_(ratio.view(shape)).add_(ref).clamp_(0.0, 1.0)
        if colour:
            chosen = (op == 3).nonzero().flatten()
            if chosen.numel():
                x.index_copy_(0, chosen, _adjust_hue(x.index_select(0, chosen), params.factors[chosen, 3]))
    return x


def _adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Rotate hue by a per-view fraction of a turn (HSV as torchvision, with the closed-form HSV→RGB)."""
    r, g, bl = x[:, 0], x[:, 1], x[:, 2]
    v = torch.maximum(torch.maximum(r, g), bl)
    span = v - torch.minimum(torch.minimum(r, g), bl)
    grey = span == 0
    s = span / torch.where(v == 0, 1.0, v)
    is_r = v == r
    is_g = (v == g) & ~is_r
    # Hue in sixths of a turn: (g - b)/span near red, 2 + (b - r)/span near green, 4 + (r - g)/span near blue.
    diff = torch.where(is_r, g - bl, torch.where(is_g, bl - r, r - g))
    h6 = diff / torch.where(grey, 1.0, span)
    h6 += torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    h6 += (hue * 6.0).view(-1, 1, 1)
    h6 -= torch.floor(h6 * (1.0 / 6.0)) * 6.0  # into [0, 6)
    vs = v * s
    out = torch.empty_like(x)
    for channel, n in enumerate((5.0, 3.0, 1.0)):  # channel = v - v·s·clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6
        k = h6 + n
        k = torch.where(k >= 6.0, k - 6.0, k)
        weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        torch.sub(v, weight.mul_(vs), out=out[:, channel])
    return out.clamp_(0.0, 1.0)


# ---- RandAugment ----
def _randaugment(planar: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """Apply each view's RandAugment ops (uint8 NCHW) grouped by (position, op, magnitude)."""
    ops, mags = params.ra_ops.tolist(), params.ra_magnitudes.tolist()  # one sync: groups are planned on the host
    for k in range(params.ra_ops.shape[1]):
        groups: dict[tuple[int, float], list[int]] = {}
        for view, (view_ops, view_mags) in enumerate(zip(ops, mags)):
            groups.setdefault((view_ops[k], view_mags[k]), []).append(view)
        for (op, magnitude), views in groups.items():
            if RA_OPS[op][0] != "Identity":
                chosen = torch.tensor(views, device=planar.device)
                planar[chosen] = _ra_op(planar[chosen], RA_OPS[op][0], magnitude)
    return planar


def _ra_op(x: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    """One RandAugment op on a uint8 batch, exactly as torchvision's RandAugment applies it."""
    from torchvision.transforms.v2 import functional as TF  # imported on first use: ~2 s of start-up otherwise

    if name in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, center=[0, 0],
                         shear=[shear, 0.0] if name == "ShearX" else [0.0, shear])
    if name in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if name == "TranslateX" else [0, int(magnitude)]
        return TF.affine(x, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0])
    if name == "Rotate":
        return TF.rotate(x, angle=magnitude)
    adjust = {"Brightness": TF.adjust_brightness, "Color": TF.adjust_saturation, "Contrast": TF.adjust_contrast,
              "Sharpness": TF.adjust_sharpness}
    if name in adjust:
        return adjust[name](x, 1.0 + magnitude)
    if name == "Posterize":
        return TF.posterize(x, int(magnitude))
    if name == "Solarize":
        return TF.solarize(x, 255.0 * magnitude)
    if name == "AutoContrast":
        return TF.autocontrast(x)
    return TF.equalize(x)
