"""Small models for CPU runs: two 4-stage CNNs and an MLP, any input channels and size."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .encoder import BlockEncoder


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


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


def conv4_encoder(in_channels: int = 3, width: float = 1.0) -> BlockEncoder:
    """A plain strided CNN: a stride-1 stem conv of 32·width channels, then 4 stages of one stride-2
    conv-BN-ReLU each (64, 128, 256, 256 channels · width); no pooling until the global average (h).

    Unlike small_cnn it has a single full-resolution conv and downsamples by strided convs, so the
    untrained network is a weaker k-NN feature and training moves it faster (28 px: 28→14→7→4→2).
    """
    widths = [max(1, round(w * width)) for w in (32, 64, 128, 256, 256)]
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    blocks["stem"] = nn.Sequential(*_conv_bn_relu(in_channels, widths[0]))
    for i in range(1, 5):
        blocks[f"stage{i}"] = nn.Sequential(*_conv_bn_relu(widths[i - 1], widths[i], stride=2))
    return BlockEncoder(blocks, out_dim=widths[-1])


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
