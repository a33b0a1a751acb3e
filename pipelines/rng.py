"""The counter RNG every random choice of fastmem draws from, and its stream ids.

Owns a stateless hash (splitmix64 over int64 tensors) keyed by (seed, sample index, view id, stream):
the same key gives the same bits on every device and in every process, so views, orders and labels
are pure functions of their key (reproducible, resumable, equal across backends). Each consumer
draws from its own stream ids, listed here, so adding a draw never shifts another.
"""

from __future__ import annotations

import torch

# Streams: each parameter draws from its own stream so adding a parameter never shifts another.
S_SCALE, S_RATIO = 0, 10  # ten RandomResizedCrop attempts each
S_TOP, S_LEFT, S_FLIP, S_JITTER, S_FACTORS, S_ORDER, S_GRAY = 20, 21, 22, 23, 24, 28, 29
S_RA_OP, S_RA_SIGN = 30, 40  # up to ten RandAugment ops each
S_VIEW_CHOICE, S_EPOCH_ORDER, S_VIEW_LABEL = 1000, 1001, 1002
S_IID_VIEW, S_MIX_BATCH = 1003, 1004  # i.i.d. view choice (view_pool.py); per-batch mixing (fastmem/train/mixing.py)


# splitmix64 over int64 tensors (wrapping multiply, masked logical shifts) ----
def _i64(value: int) -> int:
    """The two's-complement int64 value of an integer taken modulo 2^64."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _M1, _M2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64: add the golden gamma, then the finalizer (a bijection of 64-bit words)."""
    x = x + _GOLDEN
    x = (x ^ shr(x, 30)) * _M1
    x = (x ^ shr(x, 27)) * _M2
    return x ^ shr(x, 31)


def _mix_int(x: int) -> int:
    """splitmix64 on a Python integer (same bits as `_mix`)."""
    x = (x + 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return _i64(x ^ (x >> 31))


def stream_keys(seed: int, streams: torch.Tensor) -> torch.Tensor:
    """The per-(seed, stream) base of `counter_bits` (int64): bits = mix(mix(index + base) + view id)."""
    return _mix(torch.as_tensor(streams, dtype=torch.int64) + _mix_int(_i64(seed)))


def counter_bits(seed: int, indices: torch.Tensor, view_ids: torch.Tensor | int, stream: torch.Tensor | int) -> torch.Tensor:
    """64 hashed bits (int64) per broadcast (indices, view_ids, stream) key; pure function of its inputs."""
    indices = torch.as_tensor(indices, dtype=torch.int64)
    key = _mix_int(_i64(seed))
    if isinstance(stream, int):
        base: torch.Tensor | int = _mix_int(key + stream)
    else:
        base = stream_keys(seed, torch.as_tensor(stream, dtype=torch.int64, device=indices.device))
    if not isinstance(view_ids, int):
        view_ids = torch.as_tensor(view_ids, dtype=torch.int64, device=indices.device)
    return _mix(_mix(indices + base) + view_ids)


def counter_uniform(seed: int, indices: torch.Tensor, view_ids: torch.Tensor | int, stream: torch.Tensor | int) -> torch.Tensor:
    """Uniform float32 in [0, 1) with 24 random bits per key (exact on every device)."""
    return to_uniform(counter_bits(seed, indices, view_ids, stream))


def counter_randint(seed: int, indices: torch.Tensor, view_ids: torch.Tensor | int, stream: torch.Tensor | int,
                    n: int | torch.Tensor) -> torch.Tensor:
    """Integers in [0, n) (int64) per key (`n` may be a tensor of per-key bounds, broadcast like the key)."""
    return shr(counter_bits(seed, indices, view_ids, stream), 1) % n


def to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """Top 24 bits as a float32 in [0, 1)."""
    return shr(bits, 40).to(torch.float32) * (2.0**-24)
