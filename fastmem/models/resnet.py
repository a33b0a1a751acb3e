"""ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool), as in the paper, any width."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .encoder import BlockEncoder


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projected) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):  # type: ignore[override]
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def resnet18_cifar_encoder(in_channels: int = 3, width: float = 1.0) -> BlockEncoder:
    """ResNet-18 encoder, CIFAR stem; widths 64-128-256-512 times `width`; h is 512·width-d."""
    widths = [max(1, round(w * width)) for w in (64, 128, 256, 512)]
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    blocks["stem"] = nn.Sequential(
        nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
    )
    in_ch = widths[0]
    for i, out_ch in enumerate(widths):
        stride = 1 if i == 0 else 2
        blocks[f"stage{i + 1}"] = nn.Sequential(BasicBlock(in_ch, out_ch, stride), BasicBlock(out_ch, out_ch, 1))
        in_ch = out_ch
    encoder = BlockEncoder(blocks, out_dim=in_ch)
    init_like_torchvision(encoder)
    return encoder


def init_like_torchvision(module: nn.Module) -> None:
    """torchvision's ResNet initialisation, which the paper's reference code uses: convs kaiming_normal_
    (fan_out, ReLU gain), BatchNorm weight 1 and bias 0 (PyTorch's own conv default is kaiming_uniform_ with
    a=sqrt(5)). The untrained network's probe depends on it."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
