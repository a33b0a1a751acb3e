"""Model factories: `create_model(name, ...)` builds an encoder–projector pair with named probe points."""

from __future__ import annotations

from collections.abc import Callable

from fastmem.errors import fail

from .encoder import BlockEncoder, EncoderProjector, Projector, global_pool
from .resnet import resnet18_cifar_encoder
from .small import conv4_encoder, mlp_encoder, small_cnn_encoder

EncoderFactory = Callable[[int, int, float], BlockEncoder]

_ENCODERS: dict[str, EncoderFactory] = {
    "resnet18": lambda channels, size, width: resnet18_cifar_encoder(channels, width),
    "small_cnn": lambda channels, size, width: small_cnn_encoder(channels, width),
    "conv4": lambda channels, size, width: conv4_encoder(channels, width),
    "mlp": lambda channels, size, width: mlp_encoder(channels, size, width),
}

MODEL_NAMES: tuple[str, ...] = tuple(_ENCODERS)


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    width: float = 1.0,
    bottleneck_dim: int = 4096,
) -> EncoderProjector:
    """Build model `name` (one of MODEL_NAMES) with the paper's bias-free projector of width `bottleneck_dim`."""
    if name not in _ENCODERS:
        fail(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    if width <= 0 or bottleneck_dim < 0 or num_classes < 2:
        fail(f"bad model size: width={width}, bottleneck_dim={bottleneck_dim}, num_classes={num_classes}")
    encoder = _ENCODERS[name](in_channels, image_size, width)
    return EncoderProjector(encoder, bottleneck_dim, num_classes)


__all__ = ["BlockEncoder", "EncoderProjector", "MODEL_NAMES", "Projector", "create_model", "global_pool"]
