"""Data-parallel training with PyTorch's own engine: torchrun, DistributedDataParallel, collectives.

Owns the process group of a `torchrun` launch (gloo for CPU tensors, NCCL for CUDA tensors), the
rank's device, the global → per-rank batch split, the DDP wrapper (plain BatchNorm or SyncBatchNorm)
and the few collectives the trainer needs (epoch totals, a finite-loss check, BatchNorm buffers
from rank 0). Every helper works without a process group as the single-process case (world 1), so
the trainer calls them unconditionally. Only rank 0 writes files and prints; see `is_main_rank`.

Failures: a rank that fails prints its own error (one line for a user error) and exits at once; its
sockets close, so every peer's next collective fails within moments, and `distributed_session` turns
that failure into one line naming the rank (`PeerLost`, exit 2) instead of a traceback per rank.
Under torchrun the agent also sees the exit and sends SIGTERM to the other workers. A peer that
hangs, or never joins, is bounded by the process group's timeout: $FASTMEM_DDP_TIMEOUT_S seconds
(default 300) for the rendezvous and for any one collective, gloo and NCCL alike. With NCCL, PyTorch's
watchdog enforces it: `TORCH_NCCL_ASYNC_ERROR_HANDLING=3` (PyTorch's default, set unless the user set
another value) tears a rank down when a collective times out or a peer's communicator fails.
Signals (SIGINT, SIGTERM) keep their default effect under DDP (see fastmem/train/interrupt.py): the
rank ends where it is and the last checkpoint, written by rank 0 through a rename, stays intact.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from fastmem.errors import FastmemError, fail

T = TypeVar("T")
TIMEOUT_ENV = "FASTMEM_DDP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0  # the longest a rank waits for its peers (rendezvous, any one collective)
_SOURCE_LOCATION = re.compile(r"^\[[^\]]*\]\s*")  # gloo's "[.../pair.cc:561] " prefix


class PeerLost(FastmemError):
    """A collective failed on this rank because another rank failed, was killed, hangs or never joined."""


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the launch: global rank, world size, rank on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_info() -> RankInfo:
    """This process's rank, world size and local rank (from the process group, else single-process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return RankInfo()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return RankInfo(dist.get_rank(), dist.get_world_size(), local)


def world_size() -> int:
    return rank_info().world


def is_main_rank() -> bool:
    """True on rank 0 and in single-process runs: the one process that prints and writes files."""
    return rank_info().is_main


def process_group_timeout() -> timedelta:
    """How long a rank waits for its peers, in the rendezvous and in any one collective ($FASTMEM_DDP_TIMEOUT_S)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        fail(f"${TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return timedelta(seconds=seconds)


def peer_failure(error: BaseException) -> str | None:
    """The reason a collective gives for a lost peer (its first sentence), or None for any other error.

    Gloo raises plain RuntimeErrors from its transport ("Connection closed by peer", "Timed out
    waiting ..."); NCCL and the TCP store raise `torch.distributed.DistError`s.
    """
    text = str(error).strip()
    if not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in text.lower())):
        return None
    first_line = _SOURCE_LOCATION.sub("", text.splitlines()[0]) if text else type(error).__name__
    return first_line.split(". ")[0].rstrip(".")


def _peer_lost(rank: int, world: int, what: str, reason: str) -> PeerLost:
    waited = process_group_timeout().total_seconds()
    return PeerLost(f"rank {rank} of {world} stopped: {what} ({reason}); another rank failed, was killed or hangs, "
                    f"and its own output names the cause (ranks wait {waited:g} s for each other: ${TIMEOUT_ENV})")


def join_process_group() -> None:
    """Join torchrun's process group (gloo; gloo + NCCL where this rank has a GPU), bounded by the timeout."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # the watchdog ends a rank stuck in NCCL
    timeout = process_group_timeout()
    try:
        dist.init_process_group(backend=backend, timeout=timeout)
    except (RuntimeError, TimeoutError) as error:  # the TCP store: a rank that never came, or a gone host
        reason = peer_failure(error) or str(error).strip().splitlines()[0]
        raise _peer_lost(int(os.environ.get("RANK", "0")), launched_world(), "the process group never formed",
                         reason) from None


@contextlib.contextmanager
def distributed_session() -> Iterator[RankInfo]:
    """Join the torchrun process group (when WORLD_SIZE > 1), silence stdout on ranks > 0, leave at exit.

    One group serves both devices: gloo carries CPU tensors and, where CUDA exists, NCCL carries
    CUDA tensors, so `--device cpu` and `--device cuda` both work under the same launch. A group that
    is already initialized (by the caller) is used as is and left alone. A collective that fails
    because a peer is gone becomes `PeerLost`: one line naming this rank, not a traceback per rank.
    """
    created = False
    if launched_world() > 1 and not dist.is_initialized():
        join_process_group()
        created = True
    info = rank_info()
    saved_stdout = sys.stdout
    if not info.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - closed below
    try:
        yield info
        if created:  # leave together: a rank tearing down while a peer still writes can abort gloo's threads
            dist.barrier()
    except Exception as error:
        reason = peer_failure(error) if info.world > 1 else None
        if reason is None:
            raise
        raise _peer_lost(info.rank, info.world, "a collective failed", reason) from None
    finally:
        if sys.stdout is not saved_stdout:
            sys.stdout.close()
            sys.stdout = saved_stdout
        if created:
            dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: `cuda` without an index means cuda:LOCAL_RANK under torchrun."""
    info = rank_info()
    if device.type != "cuda" or info.world == 1 or device.index is not None:
        return device
    if info.local_rank >= torch.cuda.device_count():
        fail(f"local rank {info.local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
             f"use --nproc-per-node <= {torch.cuda.device_count()}")
    return torch.device("cuda", info.local_rank)


def per_rank_batch(global_batch: int, world: int) -> int:
    """--batch-size is the global batch; each of `world` ranks takes global/world samples per step."""
    if global_batch % world:
        fail(f"--batch-size {global_batch} is the global batch and must be divisible by the {world} ranks "
             f"(each rank takes batch-size/world samples per step)")
    return global_batch // world


def check_sync_bn(sync_bn: bool, device: torch.device) -> None:
    """--sync-bn with several CPU ranks is a user error (PyTorch's SyncBatchNorm has no CPU kernel)."""
    if sync_bn and world_size() > 1 and device.type != "cuda":
        fail("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs only); "
             "drop it to let each CPU rank normalize its own batch")


def wrap_data_parallel(model: torch.nn.Module, device: torch.device, sync_bn: bool) -> torch.nn.Module:
    """DDP around `model` when world > 1 (gradients averaged across ranks), else `model` itself.

    `sync_bn` converts BatchNorm layers to SyncBatchNorm (statistics over the global batch); PyTorch
    runs SyncBatchNorm on GPUs only, so on CPU each rank normalizes with its own batch's statistics.
    The returned module shares parameters with `model`: checkpoints save `model.state_dict()`, whose
    keys do not change with either wrapper, so any world size can resume them.
    """
    if world_size() == 1:
        return model
    if sync_bn:
        check_sync_bn(sync_bn, device)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world_size() > 1:
        dist.barrier()


def collective_device() -> torch.device:
    """Where tensors must live for the default group's collectives: CPU with gloo, the GPU with NCCL only."""
    backend = str(dist.get_backend()).lower()
    return torch.device("cpu") if "gloo" in backend else torch.device("cuda", torch.cuda.current_device())


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `values` over all ranks (`values` itself in a single process)."""
    if world_size() == 1:
        return values
    reduced = values.detach().to(collective_device(), torch.float64).clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(values.device)


def epoch_totals(losses: list[torch.Tensor], fit_random: torch.Tensor, fit_true: torch.Tensor,
                 seen: int) -> tuple[float, float, float, int]:
    """(mean loss, random-label hits, true-label hits, images) of the epoch over all ranks.

    Every rank runs the same number of steps on equal per-rank batches, so the mean of the ranks'
    mean losses is the mean loss of the global batches, as one process would log it.
    """
    local_mean = torch.stack(losses).mean() if losses else torch.tensor(float("nan"))
    if world_size() == 1:
        return float(local_mean), float(fit_random), float(fit_true), seen
    stats = torch.stack([local_mean.double().cpu(), fit_random.double().cpu(), fit_true.double().cpu(),
                         torch.tensor(float(seen), dtype=torch.float64)])
    total = sum_across_ranks(stats)
    return float(total[0]) / world_size(), float(total[1]), float(total[2]), int(total[3])


def losses_of_all_ranks(losses: torch.Tensor) -> torch.Tensor:
    """Per-step losses summed over ranks: non-finite wherever any rank's is, so all ranks stop together."""
    return sum_across_ranks(losses)


def broadcast_buffers_from_main(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, as DDP does before a forward.

    Done before probing and checkpointing, so every rank evaluates (and rank 0 saves) one model.
    """
    if world_size() == 1:
        return
    device = collective_device()
    for buffer in model.buffers():
        staged = buffer.detach().to(device).clone()
        dist.broadcast(staged, src=0)
        buffer.copy_(staged.to(buffer.device))


def agree_with_main(value: T) -> T:
    """Rank 0's `value` on every rank (a picklable object; the value itself without torchrun).

    Used for choices a rank could make differently on its own, e.g. `--precision auto` on a CPU.
    """
    if world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
