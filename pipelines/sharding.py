"""Sample order per epoch and its split across DDP ranks, shared by every backend (via backends/base.py).

Owns the (seed, epoch) permutation (the same on every rank and device, from the counter RNG),
the strided split into `world` shards and the batch count per rank. With drop_last every rank
gets the same number of full batches (N // world // batch_size) and no sample appears twice; without
it every sample appears exactly once per epoch and a rank gets one batch fewer only when the last
global step has fewer samples than ranks (0 < N mod (world·batch) < world).
"""

from __future__ import annotations

import torch
from fastmem.pipelines.params import epoch_permutation

from fastmem.errors import fail


def epoch_order(num_samples: int, seed: int, epoch: int, *, shuffle: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """All sample indices in this epoch's order (int64 on `device`)."""
    if shuffle:
        return epoch_permutation(num_samples, seed, epoch, device)
    return torch.arange(num_samples, device=device)


def shard_size(num_samples: int, rank: int, world: int) -> int:
    """How many of the epoch's samples rank `rank` owns (positions rank, rank + world, …)."""
    return len(range(rank, num_samples, world))


def shard(order: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s samples: every world-th index of the epoch order, starting at rank."""
    return order[rank::world]


def batches_per_epoch(num_samples: int, batch_size: int, rank: int = 0, world: int = 1, drop_last: bool = True) -> int:
    """Batches rank `rank` yields per epoch (equal on every rank with drop_last)."""
    if drop_last:
        return (num_samples // world) // batch_size
    return -(-shard_size(num_samples, rank, world) // batch_size)


def check_shard_args(num_samples: int, batch_size: int, rank: int, world: int, drop_last: bool) -> None:
    """Fail with one line on a bad batch size, rank/world, or fewer samples than one batch per rank."""
    if batch_size < 1:
        fail(f"--batch-size must be positive, got {batch_size}")
    if world < 1 or not 0 <= rank < world:
        fail(f"rank {rank} is not in [0, world) for world size {world}")
    if num_samples < 1:
        fail("the dataset is empty")
    if drop_last and num_samples // world < batch_size:
        per_rank = f" per rank ({world} ranks)" if world > 1 else ""
        fail(f"dataset has {num_samples // world} samples{per_rank}, fewer than one batch of {batch_size} (drop_last)")


def batch_bounds(num_samples: int, batch_size: int, rank: int, world: int, drop_last: bool) -> list[tuple[int, int]]:
    """(start, stop) of each batch within rank `rank`'s shard."""
    size = shard_size(num_samples, rank, world)
    count = batches_per_epoch(num_samples, batch_size, rank, world, drop_last)
    return [(k * batch_size, min((k + 1) * batch_size, size)) for k in range(count)]

