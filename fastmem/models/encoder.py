"""The encoder–projector pair and the probe-point contract every model follows.

An encoder is an ordered set of named blocks (stem, stage1, …); its output `h` is the global average
pool of the last block. The projector is the paper's bias-free head Linear(h→B) → ReLU → Linear(B→C).
Probe points, in order: every encoder block, then h, then the head's hidden layer, then z.
This module owns model structure only; training and probing live elsewhere.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """Reduce a feature map (N, C, H, W) to (N, C) by averaging; pass (N, D) through."""
    return x.mean(dim=(2, 3)) if x.ndim == 4 else x


class BlockEncoder(nn.Module):
    """A stack of named blocks; `forward` returns the pooled output h."""

    def __init__(self, blocks: OrderedDict[str, nn.Module], out_dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict(blocks)
        self.out_dim = out_dim

    @property
    def block_names(self) -> tuple[str, ...]:
        return tuple(self.blocks.keys())

    def forward(self, x: torch.Tensor, collect: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        for name, block in self.blocks.items():
            x = block(x)
            if collect is not None:
                collect[name] = global_pool(x)
        return global_pool(x)


class Projector(nn.Module):
    """Bias-free Linear(in→B) → ReLU → Linear(B→C); B = 0 means a single bias-free Linear(in→C)."""

    def __init__(self, in_dim: int, bottleneck_dim: int, num_classes: int) -> None:
        super().__init__()
        self.bottleneck_dim = bottleneck_dim
        if bottleneck_dim > 0:
            self.hidden = nn.Linear(in_dim, bottleneck_dim, bias=False)
            self.out = nn.Linear(bottleneck_dim, num_classes, bias=False)
        else:
            self.hidden = None
            self.out = nn.Linear(in_dim, num_classes, bias=False)

    def forward(self, h: torch.Tensor, collect: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if self.hidden is not None:
            h = torch.relu(self.hidden(h))
            if collect is not None:
                collect["head_hidden"] = h
        return self.out(h)


class EncoderProjector(nn.Module):
    """Encoder + projector; `forward` gives z, `forward_probes` gives every probe point pooled."""

    def __init__(self, encoder: BlockEncoder, bottleneck_dim: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = Projector(encoder.out_dim, bottleneck_dim, num_classes)
        self.num_classes = num_classes

    @property
    def probe_points(self) -> tuple[str, ...]:
        """Names of the probe points, input to output."""
        head = ("head_hidden",) if self.projector.hidden is not None else ()
        return self.encoder.block_names + ("h",) + head + ("z",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))

    def forward_probes(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Every probe point's (N, D) embedding, in `probe_points` order."""
        collected: OrderedDict[str, torch.Tensor] = OrderedDict()
        h = self.encoder(x, collect=collected)
        collected["h"] = h
        collected["z"] = self.projector(h, collect=collected)
        collected.move_to_end("z")
        return collected
