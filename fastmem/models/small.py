"""Small models for CPU runs: a 4-stage CNN and an MLP, any input channels and size."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .encoder import BlockEncoder


def _conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


def small_cnn_encoder(in_channels: int = 3, width: float = 1.0) -> BlockEncoder:
    """Stem conv, then 4 stages of conv-BN-ReLU (stages 2–4 halve the resolution); widths 32·2^i·width."""
    widths = [max(1, round(w * width)) for w in (32, 64, 128, 256)]
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    blocks["stem"] = nn.Sequential(*_conv_bn_relu(in_channels, widths[0]))
    in_ch = widths[0]
    for i, out_ch in enumerate(widths):
        pool: list[nn.Module] = [] if i == 0 else [nn.MaxPool2d(2, ceil_mode=True)]
        blocks[f"stage{i + 1}"] = nn.Sequential(*pool, *_conv_bn_relu(in_ch, out_ch))
        in_ch = out_ch
    return BlockEncoder(blocks, out_dim=in_ch)


def mlp_encoder(in_channels: int, image_size: int, width: float = 1.0, depth: int = 3) -> BlockEncoder:
    """Flatten, then `depth` Linear-BN-ReLU layers of 512·width units (probe points stem, stage1, …)."""
    hidden = max(1, round(512 * width))
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    in_dim = in_channels * image_size * image_size
    for i in range(depth):
        name = "stem" if i == 0 else f"stage{i}"
        layers: list[nn.Module] = [nn.Flatten()] if i == 0 else []
        layers += [nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        blocks[name] = nn.Sequential(*layers)
        in_dim = hidden
    return BlockEncoder(blocks, out_dim=hidden)
