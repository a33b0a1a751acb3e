"""Procedural, deterministic, class-dependent images for tests and scale benchmarks (any N, any size).

Owns the synthetic source. Each class has fixed prototype parameters (grating orientation and
frequency, colour tint, blob position and colour) that depend only on the class count, so every
split and seed shares the same classes; each sample draws its own phase, orientation/frequency
jitter, blob offset, brightness and pixel noise from a seed keyed by (seed, split). Pixel k-NN is
clearly above chance but not perfect.
"""

from __future__ import annotations

import numpy as np

from fastmem.data.types import ArrayDataset
from fastmem.errors import fail

SPLIT_IDS = {"train": 0, "test": 1}
_PROTOTYPE_SEED = 0x5EED
_CHUNK_PIXELS = 1 << 22  # H×W pixels rendered per chunk: bounds float32 temporaries to ~16 MB each
_NOISE_HALF_WIDTH = 0.25  # uniform pixel noise, fraction of full scale
_NOISE_BANK = 1 << 20  # each sample reads a window at a random offset of one shared noise draw
_TINT_JITTER = 0.2
_GRATING_AMPLITUDE = 0.18
_BLOB_AMPLITUDE = 0.3
_BLOB_SIGMA = 0.15
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _class_prototypes(num_classes: int) -> dict[str, np.ndarray]:
    """Per-class pattern parameters; a function of num_classes only."""
    rng = np.random.default_rng([_PROTOTYPE_SEED, num_classes])
    c = np.arange(num_classes)
    golden = 0.6180339887498949
    return {
        "theta": (np.pi * ((c * golden) % 1.0)).astype(np.float32),
        "freq": (1.5 + 3.0 * ((c * 0.37 + 0.11) % 1.0)).astype(np.float32),  # cycles per image
        "tint": rng.uniform(0.2, 0.8, size=(num_classes, 3)).astype(np.float32),
        "blob_xy": rng.uniform(0.25, 0.75, size=(num_classes, 2)).astype(np.float32),
        "blob_rgb": rng.uniform(-1.0, 1.0, size=(num_classes, 3)).astype(np.float32),
    }


def _render_into(
    out: np.ndarray, labels: np.ndarray, protos: dict[str, np.ndarray], rng: np.random.Generator, noise_bank: np.ndarray
) -> None:
    """Render uint8 B×H×W×C images for `labels` into `out` (C=1 is the luminance of the colour image)."""
    b, size, channels = labels.shape[0], out.shape[1], out.shape[3]
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    ys, xs = coords[None, :, None], coords[None, None, :]
    theta = protos["theta"][labels] + rng.normal(0, 0.12, b).astype(np.float32)
    freq = protos["freq"][labels] * rng.uniform(0.9, 1.1, b).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, b).astype(np.float32)
    kx = (2 * np.pi * freq * np.cos(theta))[:, None, None]
    ky = (2 * np.pi * freq * np.sin(theta))[:, None, None]
    grating = np.sin(kx * xs + ky * ys + phase[:, None, None])  # B×H×W in [-1, 1]
    grating *= np.float32(255 * _GRATING_AMPLITUDE)
    grating += np.float32(0.5)  # rounding offset for the final truncating cast
    centre = protos["blob_xy"][labels] + rng.normal(0, 0.08, (b, 2)).astype(np.float32)
    d2 = (xs - centre[:, 0, None, None]) ** 2 + (ys - centre[:, 1, None, None]) ** 2
    blob = np.exp(-d2 / np.float32(2 * _BLOB_SIGMA**2))  # B×H×W in (0, 1]
    tint = protos["tint"][labels] + rng.normal(0, _TINT_JITTER, (b, 3)).astype(np.float32)
    base = 255 * (tint + rng.normal(0, 0.08, (b, 1)).astype(np.float32))  # B×3, with brightness jitter
    blob_rgb = 255 * _BLOB_AMPLITUDE * protos["blob_rgb"][labels]  # B×3
    if channels == 1:
        base, blob_rgb = base @ _LUMA[:, None], blob_rgb @ _LUMA[:, None]
    pixels = size * size * channels
    offsets = rng.integers(0, noise_bank.shape[0] - pixels + 1, b)
    noise = np.lib.stride_tricks.sliding_window_view(noise_bank, pixels)[offsets].reshape(b, size, size, channels)
    buf = np.empty_like(blob)
    for k in range(channels):
        np.multiply(blob, blob_rgb[:, k, None, None], out=buf)
        buf += grating
        buf += base[:, k, None, None]
        buf += noise[..., k]
        np.clip(buf, 0, 255, out=buf)
        out[..., k] = buf


def make_synthetic(
    n: int,
    size: int = 32,
    num_classes: int = 10,
    channels: int = 3,
    seed: int = 0,
    *,
    split: str = "train",
) -> ArrayDataset:
    """n procedural uint8 NHWC images with balanced labels; deterministic in (seed, split)."""
    if n < 0 or size < 1 or num_classes < 1:
        fail(f"synthetic: need n >= 0, size >= 1, num_classes >= 1 (got n={n}, size={size}, classes={num_classes})")
    if channels not in (1, 3):
        fail(f"synthetic: channels must be 1 or 3, got {channels}")
    if split not in SPLIT_IDS:
        fail(f"synthetic: unknown split {split!r} (expected 'train' or 'test')")
    rng = np.random.default_rng([seed, SPLIT_IDS[split], _PROTOTYPE_SEED])
    labels = rng.permutation(np.arange(n, dtype=np.int64) % num_classes)
    protos = _class_prototypes(num_classes)
    images = np.empty((n, size, size, channels), dtype=np.uint8)
    half = round(255 * _NOISE_HALF_WIDTH)
    noise_bank = rng.integers(-half, half + 1, _NOISE_BANK + size * size * channels, dtype=np.int16).astype(np.int8)
    chunk = max(1, _CHUNK_PIXELS // (size * size))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        _render_into(images[start:stop], labels[start:stop], protos, rng, noise_bank)
    names = tuple(f"class_{i}" for i in range(num_classes))
    return ArrayDataset(images, labels, names, f"synthetic:{split}")
