"""Loader soak: every backend through `fastmem.pipelines.make_loader` for 200 short epochs, with bounded memory and threads.

Each backend yields 200 epochs of 64 images of 16 px in batches of 32, as the trainer consumes them (set_epoch,
iterate, close the epoch's iterator; every fourth epoch stops after one batch, as a step cap or a stop signal
makes it); after a warm-up of WARMUP epochs (allocator pools, DALI's buffers, FFCV's compiled pipeline),
the resident memory (VmRSS of this process plus its worker processes) may grow by at most RSS_BOUND_MIB and the
thread count (and the torch backend's worker process count) must not grow at all. The known failure modes this
catches: FFCV's EpochIterator threads leaking on every epoch (each holds its batch buffers), DALI's host memory
growing per pipeline run, DataLoader worker processes piling up. A leak of one 32-image float batch per epoch
(96 KiB) would add ~17 MiB over the measured 180 epochs, over the bound.

The torch backend runs `none` (its reference executor's per-sample `full` set costs ~10 ms an image on two
cores; the soak is about its worker processes, not its ops); the others run `full`. Measured growth per backend
is printed (`pytest -s`).
"""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from fastmem.pipelines import make_loader

EPOCHS, WARMUP = 200, 20
RSS_BOUND_MIB = 8.0
BACKENDS = {  # backend → (augment, backend keywords, the package it needs)
    "device": ("full", {}, None),
    "torch": ("none", {"workers": 2}, None),
    "dali": ("full", {}, "nvidia.dali"),
    "ffcv": ("full", {}, "ffcv"),
}


def _status(pid: int | str) -> dict[str, int]:
    """VmRSS (KiB) and Threads of a process, from /proc/<pid>/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "Threads"):
            values[key] = int(rest.split()[0])
    return values


def _children() -> list[int]:
    """This process's live child processes (the torch backend's DataLoader workers; zombies left out)."""
    pids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        try:
            listed = (task / "children").read_text().split()
        except FileNotFoundError:  # a thread that ended while we looked
            continue
        for pid in listed:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError):
                continue
            if state != "Z":
                pids.append(int(pid))
    return pids


def _footprint() -> tuple[float, int, int]:
    """(RSS of this process and its children in MiB, threads of this process, child processes)."""
    gc.collect()
    children = _children()
    kib = _status("self")["VmRSS"]
    for pid in children:
        try:
            kib += _status(pid).get("VmRSS", 0)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return kib / 1024, _status("self")["Threads"], len(children)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_two_hundred_epochs_leave_memory_and_threads_bounded(backend: str, one_torch_thread: None) -> None:
    augment, options, package = BACKENDS[backend]
    if package is not None and importlib.util.find_spec(package.split(".")[0]) is None:
        pytest.skip(f"{package} is not installed (pip install -e .[{backend}])")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    baseline = set(_children())  # child processes of earlier tests (FFCV's helper, …) are not this loader's
    loader = make_loader(backend, images, rng.integers(0, 10, 64), augment=augment, batch_size=32, device="cpu",
                         seed=1, **options)
    try:
        seen = 0
        for epoch in range(EPOCHS):
            if epoch == WARMUP:
                rss_before, threads_before, _ = _footprint()
                workers_before = set(_children()) - baseline
            loader.set_epoch(epoch)
            batches = iter(loader)
            for batch in batches:
                seen += batch.images.shape[0]
                if epoch % 4 == 3:  # a quarter of the epochs stop after one batch, as max_steps_per_epoch or a signal do
                    break
            batches.close()  # as the trainer does at every epoch's end
        rss_after, threads_after, _ = _footprint()
        workers_after = set(_children()) - baseline
    finally:
        close = getattr(loader, "close", None)
        if callable(close):
            close()
    growth = rss_after - rss_before
    print(f"\n{backend}: RSS {rss_before:.1f} -> {rss_after:.1f} MiB (+{growth:.2f}) over {EPOCHS - WARMUP} epochs; "
          f"threads {threads_before} -> {threads_after}; worker processes {len(workers_before)} -> {len(workers_after)}")
    assert seen == EPOCHS * 64 - (EPOCHS // 4) * 32
    assert growth <= RSS_BOUND_MIB, f"{backend}: RSS grew {growth:.1f} MiB over {EPOCHS - WARMUP} epochs"
    assert threads_after <= threads_before, f"{backend}: threads {threads_before} -> {threads_after}"
    assert len(workers_after) <= max(len(workers_before), options.get("workers", 0))
    if backend == "torch":
        assert len(workers_before) == 2 and workers_after == workers_before  # the persistent workers, started once


def test_closing_the_torch_loader_ends_its_worker_processes(one_torch_thread: None) -> None:
    before = set(_children())
    loader = make_loader("torch", np.zeros((64, 8, 8, 1), np.uint8), np.arange(64) % 4, augment="none",
                         batch_size=32, workers=2)
    next(iter(loader))  # an epoch abandoned after one batch, as a stop signal leaves it
    assert len(set(_children()) - before) == 2
    loader.close()
    assert set(_children()) - before == set()
    assert sum(b.images.shape[0] for b in loader) == 64  # a later epoch starts new workers
    loader.close()
    assert set(_children()) - before == set()
