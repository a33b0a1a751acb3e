"""The reference executor: torchvision's functional ops are the oracle; batches equal per-sample runs."""

from __future__ import annotations

import pytest
import torch
from fastmem.pipelines.executors.reference import apply_views
from fastmem.pipelines.params import RA_OPS, AugmentSpec, ViewParams, sample_view_params, view_ids_for
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

PHOTOMETRIC_TOL = 1e-5  # the contract allows 2/255 against torchvision; the reference is at float precision (≈ 2e-6)
JITTER_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # defined in conftest.py


def _images(n: int, size: tuple[int, int] = (16, 16), channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Random uint8 NHWC images with some flat, gray and saturated pixels (the HSV edge cases)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *size, channels), dtype=torch.uint8, generator=g)
    images[:, :2, :2] = 128  # gray
    images[:, -2:, :2] = 0  # black
    if channels == 3:
        images[:, :2, -2:] = torch.tensor([255, 0, 0], dtype=torch.uint8)  # pure red
        images[:, -2:, -2:] = torch.tensor([0, 255, 255], dtype=torch.uint8)  # cyan
    return images


def _params(spec: str, n: int, size: tuple[int, int] = (16, 16), channels: int = 3, epoch: int = 1) -> ViewParams:
    s = AugmentSpec.parse(spec)
    indices = torch.arange(n)
    return sample_view_params(s, 0, indices, view_ids_for(s, 0, epoch, indices), size, channels)


def _oracle_full(image: torch.Tensor, p: ViewParams, i: int) -> torch.Tensor:
    """One view of `full` with torchvision's functional ops on a float CHW image."""
    x = image.permute(2, 0, 1).float() / 255
    top, left, h, w = p.crop[i].tolist()
    x = TF.resized_crop(x, top, left, h, w, list(p.image_size), antialias=True)
    if p.flip[i]:
        x = TF.horizontal_flip(x)
    if p.jitter[i]:
        for op in p.order[i].tolist():
            x = JITTER_OPS[op](x, float(p.factors[i, op]))
    if p.grayscale[i] and x.shape[0] == 3:
        x = TF.rgb_to_grayscale(x, 3)
    return x


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_full_views_match_torchvision_functional_ops(channels: int, size: tuple[int, int]) -> None:
    images, p = _images(64, size, channels), _params("full", 64, size, channels)
    out = apply_views(images, p)
    assert out.shape == (64, channels, *size) and out.is_contiguous(memory_format=torch.channels_last)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    for i in range(64):
        torch.testing.assert_close(out[i], _oracle_full(images[i], p, i), rtol=0, atol=PHOTOMETRIC_TOL)


def test_standard_is_an_exact_reflect_padded_crop_and_flip() -> None:
    images, p = _images(32), _params("standard", 32)
    out = apply_views(images, p)
    pad = 16 // 8
    for i in range(32):
        x = TF.pad(images[i].permute(2, 0, 1), [pad] * 4, padding_mode="reflect")
        top, left = p.crop[i, 0].item() + pad, p.crop[i, 1].item() + pad
        x = x[:, top:top + 16, left:left + 16]
        if p.flip[i]:
            x = TF.horizontal_flip(x)
        assert torch.equal(out[i], x.float() / 255), i


def test_none_returns_the_raw_pixels_scaled() -> None:
    images = _images(8)
    assert torch.equal(apply_views(images, _params("none", 8)), images.permute(0, 3, 1, 2).float() / 255)


@pytest.mark.parametrize("channels", [1, 3])
def test_randaugment_views_match_torchvision_randaugment_ops(channels: int) -> None:
    spec = AugmentSpec.parse("strength:1.0")
    images, p = _images(48, channels=channels), _params("strength:1.0", 48, channels=channels)
    out = apply_views(images, p)
    reference = v2.RandAugment(spec.num_ops, spec.magnitude, num_magnitude_bins=100)
    for i in range(48):
        x = images[i].permute(2, 0, 1).contiguous()
        for op, magnitude in zip(p.ra_ops[i].tolist(), p.ra_magnitudes[i].tolist()):
            x = reference._apply_image_or_video_transform(
                x, RA_OPS[op][0], magnitude, interpolation=reference.interpolation, fill=reference._fill)
        assert torch.equal(out[i], x.float() / 255), (i, [RA_OPS[o][0] for o in p.ra_ops[i].tolist()])


@pytest.mark.parametrize("spec", ["full", "standard", "strength:0.8", "fullfixed:3"])
def test_a_batch_equals_its_views_computed_one_at_a_time(spec: str) -> None:
    images, p = _images(40, (13, 13)), _params(spec, 40, (13, 13))
    batch = apply_views(images, p)
    s = AugmentSpec.parse(spec)
    for i in range(40):
        one = torch.tensor([i])
        single = apply_views(images[i:i + 1], sample_view_params(s, 0, one, view_ids_for(s, 0, 1, one), 13, 3))
        assert torch.equal(batch[i], single[0]), i


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("spec", ["none", "standard", "full", "strength:1.0"])
def test_the_source_images_are_never_modified(spec: str, channels: int) -> None:
    images = _images(16, channels=channels)
    before = images.clone()
    apply_views(images, _params(spec, 16, channels=channels))
    assert torch.equal(images, before)


def test_layout_out_buffer_and_memory_format() -> None:
    images, p = _images(8), _params("full", 8)
    reference = apply_views(images, p)
    assert torch.equal(apply_views(images.permute(0, 3, 1, 2).contiguous(), p), reference)
    planar = apply_views(images, p, channels_last=False)
    assert planar.is_contiguous() and torch.equal(planar, reference)
    out = torch.empty((8, 3, 16, 16), dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    assert apply_views(images, p, out) is out
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=2**-8)


def test_mismatched_images_and_params_are_rejected() -> None:
    with pytest.raises(ValueError, match="do not match"):
        apply_views(_images(4, (8, 8)), _params("full", 4))
    with pytest.raises(ValueError, match="uint8"):
        apply_views(_images(4).float(), _params("full", 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("spec", ["full", "standard", "strength:0.8"])
def test_cuda_views_equal_cpu_views(spec: str) -> None:
    images, p = _images(256), _params(spec, 256)
    cpu = apply_views(images, p)
    s = AugmentSpec.parse(spec)
    indices = torch.arange(256, device="cuda")
    gpu_params = sample_view_params(s, 0, indices, view_ids_for(s, 0, 1, indices), (16, 16), 3)
    gpu = apply_views(images.cuda(), gpu_params).cpu()
    # Measured on an H200: ≤ 1.5e-6 (a few float32 ulps in ~1e-4 of pixels); RandAugment rounds to uint8.
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-5 if spec != "strength:0.8" else 1 / 255)
