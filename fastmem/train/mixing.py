"""Experiment I: per-batch Mixup and CutMix of the inputs, labels kept (as the reference code does).

Owns the draw and the mixing. Per training step, one uniform u decides: u < p_mixup → Mixup,
x ← λ·x + (1-λ)·x[perm]; else u < p_mixup + p_cutmix → CutMix, a box of area fraction ≈ (1-λ)
(side √(1-λ) of each image side, rounded; placed uniformly, wholly inside the image) is pasted
from x[perm]; else the batch is unchanged. λ ~ U(0, 1) and perm is a uniform permutation of the
batch. Targets are never mixed. Every draw comes from a generator seeded by the counter RNG at
(seed, epoch, step), so a resumed run mixes exactly as an uninterrupted one, on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastmem.errors import fail
from fastmem.pipelines.rng import S_MIX_BATCH, counter_bits


@dataclass(frozen=True)
class BatchMix:
    """What one step does to its batch: kind none | mixup | cutmix, λ, the partner order and the CutMix box."""

    kind: str
    lam: float
    perm: torch.Tensor  # (B,) int64 partner of each image, on the CPU
    box: tuple[int, int, int, int]  # top, left, height, width of the pasted box (CutMix; zeros otherwise)


def check_mixing_knobs(mixup: float, cutmix: float) -> None:
    """One line when the probabilities are not in [0, 1] or add up to more than 1."""
    for flag, value in (("--mixup", mixup), ("--cutmix", cutmix)):
        if not 0.0 <= value <= 1.0:
            fail(f"{flag} is a per-batch probability in [0, 1], got {value}")
    if mixup + cutmix > 1.0:
        fail(f"--mixup {mixup} + --cutmix {cutmix} exceeds 1 (per batch, one of them or neither applies)")


def _step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """A CPU generator seeded by 63 counter-RNG bits of (seed, epoch, step): independent of global RNG state."""
    bits = int(counter_bits(seed, torch.tensor([epoch]), step, S_MIX_BATCH)[0])
    return torch.Generator().manual_seed(bits & ((1 << 63) - 1))


def draw_batch_mix(
    batch_size: int, image_size: tuple[int, int], *, mixup: float, cutmix: float, seed: int, epoch: int, step: int,
) -> BatchMix:
    """The mixing of step `step` of epoch `epoch` (a pure function of its arguments)."""
    generator = _step_generator(seed, epoch, step)
    u, lam, top_u, left_u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    perm = torch.randperm(batch_size, generator=generator)
    if u < mixup:
        return BatchMix("mixup", lam, perm, (0, 0, 0, 0))
    if u < mixup + cutmix:
        height, width = image_size
        side = (1.0 - lam) ** 0.5
        box_h, box_w = round(height * side), round(width * side)
        top, left = int(top_u * (height - box_h + 1)), int(left_u * (width - box_w + 1))
        return BatchMix("cutmix", lam, perm, (top, left, box_h, box_w))
    return BatchMix("none", lam, perm, (0, 0, 0, 0))


def apply_batch_mix(images: torch.Tensor, mix: BatchMix) -> torch.Tensor:
    """The mixed batch (a new tensor in the input's dtype and memory format; the input is not modified)."""
    if mix.kind == "none":
        return images
    partner = images[mix.perm.to(images.device)]
    if mix.kind == "mixup":
        return images * mix.lam + partner * (1.0 - mix.lam)
    top, left, box_h, box_w = mix.box
    mixed = images.clone()
    mixed[:, :, top:top + box_h, left:left + box_w] = partner[:, :, top:top + box_h, left:left + box_w]
    return mixed


def mix_batch(images: torch.Tensor, *, mixup: float, cutmix: float, seed: int, epoch: int, step: int) -> torch.Tensor:
    """Mixup / CutMix of a (B, C, H, W) batch for this (seed, epoch, step); unchanged when both are 0."""
    if mixup <= 0.0 and cutmix <= 0.0:
        return images
    mix = draw_batch_mix(images.shape[0], tuple(images.shape[2:]), mixup=mixup, cutmix=cutmix,
                         seed=seed, epoch=epoch, step=step)
    return apply_batch_mix(images, mix)
