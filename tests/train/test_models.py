"""Every registered model: probe points named in order, embeddings of the right shapes, channels_last."""

from __future__ import annotations

import pytest
import torch

from fastmem.errors import FastmemError
from fastmem.models import MODEL_NAMES, create_model


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 17)])
def test_every_model_names_probe_points_in_order_with_pooled_shapes(name: str, channels: int, size: int) -> None:
    model = create_model(name, num_classes=7, in_channels=channels, image_size=size, width=0.25, bottleneck_dim=48)
    model = model.to(memory_format=torch.channels_last)
    x = torch.rand(3, channels, size, size).contiguous(memory_format=torch.channels_last)
    probes = model.forward_probes(x)
    points = model.probe_points
    assert tuple(probes) == points
    assert points[0] == "stem" and points[-3:] == ("h", "head_hidden", "z")
    assert all(p.startswith("stage") for p in points[1:-3])
    assert probes["head_hidden"].shape == (3, 48)
    assert probes["z"].shape == (3, 7)
    assert probes["h"].shape == (3, model.encoder.out_dim)
    assert all(v.ndim == 2 and v.shape[0] == 3 for v in probes.values())
    torch.testing.assert_close(model(x), probes["z"])


def test_resnet18_matches_the_papers_sizes() -> None:
    model = create_model("resnet18", num_classes=10, bottleneck_dim=65536)
    encoder = sum(p.numel() for p in model.encoder.parameters())
    head = sum(p.numel() for p in model.projector.parameters())
    assert 11.0e6 < encoder < 11.3e6  # ResNet-18, CIFAR stem, no fc
    assert head == 512 * 65536 + 65536 * 10  # bias-free projector, ~34M
    assert model.probe_points == ("stem", "stage1", "stage2", "stage3", "stage4", "h", "head_hidden", "z")
    assert model.encoder.blocks["stem"][0].stride == (1, 1)  # CIFAR stem: 3x3 stride 1, no max-pool


def test_projector_is_bias_free_and_zero_width_means_linear_head() -> None:
    model = create_model("small_cnn", num_classes=10, in_channels=1, image_size=28, bottleneck_dim=0)
    assert model.probe_points[-2:] == ("h", "z")
    assert all(m.bias is None for m in model.projector.modules() if isinstance(m, torch.nn.Linear))


def test_unknown_model_is_a_user_error() -> None:
    with pytest.raises(FastmemError, match="unknown model 'vgg'"):
        create_model("vgg", num_classes=10)


def test_resnet18_is_initialised_like_torchvision() -> None:
    """kaiming_normal_(fan_out) convs (std sqrt(2 / fan_out)), BN weight 1 / bias 0: the reference code's init."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, bottleneck_dim=64)
    conv = model.encoder.blocks["stage3"][0].conv2  # 256 → 256, 3x3: fan_out = 256·9
    expected = (2.0 / (256 * 9)) ** 0.5
    assert abs(float(conv.weight.detach().std()) - expected) < 0.02 * expected  # PyTorch's default would be ≈ 0.58× this
    bns = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in bns)


def test_conv4_is_a_plain_strided_cnn() -> None:
    """conv4: one stride-1 stem, then stride-2 stages and no pooling before the global average; 28 px → 2 px."""
    model = create_model("conv4", num_classes=10, in_channels=1, image_size=28, width=1.0, bottleneck_dim=32)
    convs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(1, 1)] + [(2, 2)] * 4
    assert not any(isinstance(m, (torch.nn.MaxPool2d, torch.nn.AvgPool2d)) for m in model.modules())
    collect: dict[str, torch.Tensor] = {}
    x = torch.rand(2, 1, 28, 28)
    for name, block in model.encoder.blocks.items():
        x = block(x)
        collect[name] = x
    assert collect["stage4"].shape == (2, 256, 2, 2) and model.encoder.out_dim == 256
