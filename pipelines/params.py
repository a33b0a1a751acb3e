"""The one parameter sampler: augmentation specs and per-view parameters.

Owns `AugmentSpec` (what augmentation a run asks for), the choice of view ids per epoch, the
per-view parameters every backend executes (`ViewParams`) and per-view targets, all drawn from the
counter RNG (rng.py) keyed by (seed, sample index, view id, stream). It draws randomness; it never
touches pixels (see executors/). Every value is computed with integer hashing and correctly rounded
float ops only (+, -, *, /, sqrt, floor, round), so parameters are identical on CPU and CUDA.
`sample_view_params` is the definition; executors/fused_cuda_sampled.py is its in-kernel twin for
none/standard/full (the same ops in the same order inside the Triton executor, tested bit for bit
against it): a change here is a change there. Contract: docs/augmentation_params.md.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from dataclasses import dataclass

import torch
from fastmem.pipelines.rng import (
    S_EPOCH_ORDER,
    S_FACTORS,
    S_FLIP,
    S_GRAY,
    S_JITTER,
    S_LEFT,
    S_ORDER,
    S_RA_OP,
    S_RA_SIGN,
    S_RATIO,
    S_SCALE,
    S_TOP,
    S_VIEW_CHOICE,
    S_VIEW_LABEL,
    counter_bits,
    counter_randint,
    shr,
    to_uniform,
)

from fastmem.errors import fail

# The ops of each augmentation kind, in execution order: declared here once. Executors (executors/*.OPS)
# and backends (registry.py) declare the ops they implement; a kind runs only where every op is implemented.
AUGMENT_OPS: dict[str, tuple[str, ...]] = {
    "none": (),
    "standard": ("pad_crop", "flip"),  # reflect-pad by H//8 and crop H×W (a translation), horizontal flip
    "full": ("resized_crop", "flip", "color_jitter", "grayscale"),  # SimCLR's set without blur
    "strength": ("randaugment",),  # RandAugment at strength A (`strength:A`)
}
AUGMENT_KINDS: tuple[str, ...] = tuple(AUGMENT_OPS)
AUGMENT_NAMES: tuple[str, ...] = tuple(kind for kind in AUGMENT_KINDS if kind != "strength")  # bare-word specs
AUGMENT_FORMS = "none, standard, full, strength:A (0 ≤ A ≤ 1), fullfixed:N[:same|random]"

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = (0.8, 0.8, 0.8, 0.2)  # brightness, contrast, saturation, hue
JITTER_LOWS = (1 - JITTER[0], 1 - JITTER[1], 1 - JITTER[2], -JITTER[3])  # each factor's range
JITTER_HIGHS = (1 + JITTER[0], 1 + JITTER[1], 1 + JITTER[2], JITTER[3])
LOG_RATIO = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))  # the crop's log-ratio range
EXP_TAYLOR = tuple(1.0 / math.factorial(n) for n in range(14, -1, -1))  # _exp_small's Horner coefficients, x^14 first
P_FLIP, P_JITTER, P_GRAY = 0.5, 0.8, 0.2
RA_BINS = 100
# torchvision's RandAugment op space, in its order: (name, signed).
RA_OPS: tuple[tuple[str, bool], ...] = (
    ("Identity", False), ("ShearX", True), ("ShearY", True), ("TranslateX", True), ("TranslateY", True),
    ("Rotate", True), ("Brightness", True), ("Color", True), ("Contrast", True), ("Sharpness", True),
    ("Posterize", False), ("Solarize", False), ("AutoContrast", False), ("Equalize", False),
)
JITTER_ORDERS: tuple[tuple[int, ...], ...] = tuple(itertools.permutations(range(4)))  # the 24 op orders
_STREAMS_USED = {"none": 0, "standard": S_FLIP + 1, "full": S_GRAY + 1, "strength": S_RA_SIGN + 10}


@dataclass(frozen=True)
class AugmentSpec:
    """What augmentation a run asks for; `parse` reads the command-line form."""

    kind: str = "full"  # none | standard | full | strength
    strength: float = 0.0  # RandAugment strength A for kind == "strength"
    views: int = 0  # N fixed views per sample (kind "full"); 0 = a fresh view every epoch
    view_labels: str = "same"  # same | random: the label of each fixed view

    @classmethod
    def parse(cls, text: str | AugmentSpec) -> AugmentSpec:
        """none | standard | full | strength:A | fullfixed:N[:same|random] (fullfixed_N also accepted)."""
        if isinstance(text, AugmentSpec):
            return text
        key = str(text).strip().lower()
        if key in AUGMENT_NAMES:
            return cls(kind=key)
        if m := re.fullmatch(r"strength:([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)", key):
            a = float(m.group(1))
            if 0.0 <= a <= 1.0:
                return cls(kind="strength", strength=a)
        if m := re.fullmatch(r"fullfixed[:_]([0-9]+)(?::(same|random))?", key):
            n = int(m.group(1))
            if n >= 1:
                return cls(kind="full", views=n, view_labels=m.group(2) or "same")
        fail(f"unknown augmentation {text!r}; expected {AUGMENT_FORMS}")

    def __str__(self) -> str:
        if self.kind == "strength":
            return f"strength:{self.strength:g}"
        if self.views:
            return f"fullfixed:{self.views}:{self.view_labels}"
        return self.kind

    @property
    def fixed(self) -> bool:
        """True when each sample has exactly `views` views."""
        return self.views > 0

    @property
    def num_views(self) -> int | None:
        """N for fixed views, 1 for none, None when every epoch draws a fresh view."""
        return self.views if self.fixed else (1 if self.kind == "none" else None)

    @property
    def ops(self) -> tuple[str, ...]:
        """The ops a view of this spec runs (AUGMENT_OPS of its kind)."""
        return AUGMENT_OPS[self.kind]

    @property
    def num_ops(self) -> int:
        """RandAugment ops per view: int(A·10//3 + 1) (0 unless kind == "strength")."""
        return int(self.strength * 10 // 3 + 1) if self.kind == "strength" else 0

    @property
    def magnitude(self) -> int:
        """RandAugment magnitude bin of 100: min(int(100·A), 99)."""
        return min(int(100 * self.strength), RA_BINS - 1)


# ---- view ids and labels ----
def view_ids_for(spec: AugmentSpec, seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
    """View id per sample this epoch: a draw in [0, N) for fixed views, 0 for none, else the epoch."""
    if spec.fixed:
        return counter_randint(seed, indices, epoch, S_VIEW_CHOICE, spec.views)
    return torch.full_like(indices, 0 if spec.kind == "none" else epoch, dtype=torch.int64)


def view_targets(
    spec: AugmentSpec, targets: torch.Tensor, label_seed: int, indices: torch.Tensor, view_ids: torch.Tensor,
    num_classes: int,
) -> torch.Tensor:
    """Training target per view: the sample's target, or for fixed `random` views a label per (sample, view)."""
    if spec.fixed and spec.view_labels == "random":
        return counter_randint(label_seed, indices, view_ids, S_VIEW_LABEL, num_classes)
    return targets[indices.to(targets.device)].to(indices.device)


def epoch_permutation(num_samples: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The (seed, epoch) shuffle of range(num_samples): sorted hash keys, the same on every device."""
    keys = shr(counter_bits(seed, torch.arange(num_samples, device=device), epoch, S_EPOCH_ORDER), 1)
    return torch.argsort(keys, stable=True)


# ---- per-view parameters ----
@dataclass(frozen=True)
class ViewParams:
    """Per-view augmentation parameters of a batch (tensors on the indices' device)."""

    kind: str  # none | standard | full | strength: how the executor reads `crop`
    image_size: tuple[int, int]  # (H, W) of source and output
    channels: int
    crop: torch.Tensor  # (B, 4) int64 top, left, height, width in source pixels (standard: reflect-padded offsets)
    flip: torch.Tensor  # (B,) bool, horizontal flip after the crop
    jitter: torch.Tensor  # (B,) bool, colour jitter applied
    factors: torch.Tensor  # (B, 4) float32 brightness, contrast, saturation, hue
    order: torch.Tensor  # (B, 4) int64 jitter op applied at position k (0 b, 1 c, 2 s, 3 h)
    grayscale: torch.Tensor  # (B,) bool
    ra_ops: torch.Tensor  # (B, K) int64 RandAugment op ids (indices into RA_OPS)
    ra_magnitudes: torch.Tensor  # (B, K) float32 signed magnitudes, torchvision's value for each op

    def __len__(self) -> int:
        return int(self.crop.shape[0])

    @property
    def ops(self) -> tuple[str, ...]:
        """The ops these views run (AUGMENT_OPS of their kind): what an executor must implement."""
        return AUGMENT_OPS[self.kind]


def sample_view_params(
    spec: AugmentSpec, seed: int, indices: torch.Tensor, view_ids: torch.Tensor,
    image_size: int | tuple[int, int], channels: int,
) -> ViewParams:
    """Draw every view's parameters from the counter RNG keyed by (seed, index, view id)."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    indices = torch.as_tensor(indices, dtype=torch.int64)
    dev, b = indices.device, indices.shape[0]
    view_ids = torch.as_tensor(view_ids, dtype=torch.int64, device=dev).expand(b)
    streams = torch.arange(_STREAMS_USED[spec.kind], device=dev).unsqueeze(1)
    bits = counter_bits(seed, indices, view_ids, streams)  # (streams, B): one hash per stream
    u = to_uniform(bits)
    zero = torch.zeros(b, dtype=torch.int64, device=dev)
    crop = torch.stack([zero, zero, zero + height, zero + width], dim=1)
    flip = jitter = gray = torch.zeros(b, dtype=torch.bool, device=dev)
    ones = torch.ones(b, device=dev)
    factors = torch.stack([ones, ones, ones, ones * 0.0], dim=1)
    order = _constant("orders", dev)[zero]
    if spec.kind == "standard":
        pad = height // 8
        crop[:, 0] = _randint_u(u[S_TOP], 2 * pad + 1) - pad
        crop[:, 1] = _randint_u(u[S_LEFT], 2 * pad + 1) - pad
        flip = u[S_FLIP] < P_FLIP
    elif spec.kind == "full":
        crop = _resized_crop_boxes(u, height, width)
        flip = u[S_FLIP] < P_FLIP
        jitter = u[S_JITTER] < P_JITTER
        factors = torch.stack([lo + (hi - lo) * u[S_FACTORS + i]
                               for i, (lo, hi) in enumerate(zip(JITTER_LOWS, JITTER_HIGHS))], 1)
        order = _constant("orders", dev)[shr(bits[S_ORDER], 1) % len(JITTER_ORDERS)]
        gray = u[S_GRAY] < P_GRAY
    k = spec.num_ops
    ra_ops = shr(bits[S_RA_OP:S_RA_OP + k], 1).T % len(RA_OPS)
    ra_magnitudes = torch.zeros(b, k, device=dev)
    if k:
        table = ra_magnitude_table(spec.magnitude, height, width).to(dev)
        negate = (u[S_RA_SIGN:S_RA_SIGN + k].T <= 0.5) & _constant("ra_signed", dev)[ra_ops]  # as torchvision
        ra_magnitudes = torch.where(negate, -table[ra_ops], table[ra_ops])
    return ViewParams(spec.kind, (height, width), channels, crop, flip, jitter, factors, order, gray,
                      ra_ops, ra_magnitudes)


@functools.lru_cache(maxsize=16)
def _constant(name: str, device: torch.device) -> torch.Tensor:
    """Small lookup tables, built once per device (no host-to-device copy per batch)."""
    if name == "orders":
        return torch.tensor(JITTER_ORDERS, dtype=torch.int64, device=device)
    return torch.tensor([signed for _, signed in RA_OPS], dtype=torch.bool, device=device)


def ra_magnitude_table(magnitude: int, height: int, width: int) -> torch.Tensor:
    """torchvision RandAugment's magnitude of each op at bin `magnitude` of 100 (float32, unsigned)."""
    spaces = {
        "ShearX": torch.linspace(0.0, 0.3, RA_BINS), "ShearY": torch.linspace(0.0, 0.3, RA_BINS),
        "TranslateX": torch.linspace(0.0, 150.0 / 331.0 * width, RA_BINS),
        "TranslateY": torch.linspace(0.0, 150.0 / 331.0 * height, RA_BINS),
        "Rotate": torch.linspace(0.0, 30.0, RA_BINS), "Brightness": torch.linspace(0.0, 0.9, RA_BINS),
        "Color": torch.linspace(0.0, 0.9, RA_BINS), "Contrast": torch.linspace(0.0, 0.9, RA_BINS),
        "Sharpness": torch.linspace(0.0, 0.9, RA_BINS),
        "Posterize": (8 - (torch.arange(RA_BINS) / ((RA_BINS - 1) / 4))).round().int(),
        "Solarize": torch.linspace(1.0, 0.0, RA_BINS),
    }
    return torch.tensor([float(spaces[name][magnitude]) if name in spaces else 0.0 for name, _ in RA_OPS])


def _randint_u(u: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """floor(u·n) for 24-bit uniforms u (exact in float64), as int64."""
    return torch.floor(u.double() * n).long()


def _exp_small(x: torch.Tensor) -> torch.Tensor:
    """exp(x) for |x| < 0.3 in float64 by Horner over its Taylor series (basic ops only: device-exact)."""
    acc = torch.full_like(x, EXP_TAYLOR[0])
    for coefficient in EXP_TAYLOR[1:]:
        acc = acc * x + coefficient
    return acc


def _resized_crop_boxes(u: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision RandomResizedCrop boxes: 10 tries of (scale, log-ratio), first fit, else centre fallback."""
    area = float(height * width)
    scale = CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[S_SCALE:S_SCALE + 10].double()
    lo, hi = LOG_RATIO
    ratio = _exp_small(lo + (hi - lo) * u[S_RATIO:S_RATIO + 10].double())
    target = area * scale
    w = torch.round(torch.sqrt(target * ratio)).long()  # round half to even, as Python's round()
    h = torch.round(torch.sqrt(target / ratio)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    tries = torch.arange(10, device=u.device).unsqueeze(1)
    first = torch.where(fits, tries, 10).amin(0)
    found = first < 10
    pick = first.clamp(max=9).unsqueeze(0)
    fh, fw = resized_crop_fallback(height, width)
    h = torch.where(found, h.gather(0, pick)[0], fh)
    w = torch.where(found, w.gather(0, pick)[0], fw)
    top = torch.where(found, _randint_u(u[S_TOP], height - h + 1), (height - h) // 2)
    left = torch.where(found, _randint_u(u[S_LEFT], width - w + 1), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def resized_crop_fallback(height: int, width: int) -> tuple[int, int]:
    """torchvision's centre-crop size (h, w) when none of the 10 tries fits: the image clipped to the ratio range."""
    in_ratio = width / height
    if in_ratio < min(CROP_RATIO):
        return int(round(width / min(CROP_RATIO))), width
    if in_ratio > max(CROP_RATIO):
        return height, int(round(height * max(CROP_RATIO)))
    return height, width
