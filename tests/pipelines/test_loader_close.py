"""The loader contract's `close()` and `with` use, on every backend installed here.

`close()` releases what a loader holds beyond memory (the torch backend's worker processes, FFCV's epoch
thread, DALI's pipeline threads), may be called again, and leaves the loader usable: a later iteration starts
them again. Leaving a `with make_loader(...) as loader:` block closes it, also when the block raises. A backend
is skipped only when its optional dependency (its registry entry's extra) is not installed, and the skip says why.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
from fastmem.pipelines import BACKENDS, PIPELINE_NAMES, make_loader

from fastmem.errors import FastmemError

N, SIZE, BATCH = 48, 8, 16
OPTIONS = {"torch": {"workers": 2}}  # the torch backend with worker processes: what close() must end
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # defined in conftest.py


def _loader(pipeline: str):
    """make_loader on a small synthetic array; skips (saying why) only when the backend's extra is missing."""
    images = np.random.default_rng(0).integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)
    try:
        return make_loader(pipeline, images, np.arange(N) % 4, augment="standard", batch_size=BATCH, seed=1,
                           **OPTIONS.get(pipeline, {}))
    except FastmemError as err:
        extra = BACKENDS[pipeline].extra
        if extra and f".[{extra}]" in str(err):
            pytest.skip(f"the {pipeline} pipeline's extra is not installed: {err}")
        raise


def _threads() -> int:
    """This process's thread count (native threads included: DALI's), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line in /proc/self/status")


def _threads_settle_to(limit: int, seconds: float = 5.0) -> bool:
    """Whether the thread count falls to `limit` within `seconds` (a closed queue's feeder thread ends on its own)."""
    deadline = time.monotonic() + seconds
    while _threads() > limit:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _workers(before: set) -> set:
    """Live child processes started since `before` (the torch backend's DataLoader workers)."""
    return set(multiprocessing.active_children()) - before


@pytest.mark.parametrize("pipeline", PIPELINE_NAMES)
def test_with_closes_the_loader_and_close_may_be_called_again(pipeline: str) -> None:
    with _loader(pipeline) as warm:  # pools that live as long as the process (numba's, torch's) start here
        next(iter(warm))
    threads, children = _threads(), set(multiprocessing.active_children())
    with _loader(pipeline) as loader:
        batches = iter(loader)  # kept alive: closing the loader, not collecting the epoch's generator, must release
        assert next(batches).images.shape[0] == BATCH  # an epoch abandoned after one batch
        if pipeline == "torch":
            assert len(_workers(children)) == 2
    assert _threads_settle_to(threads), f"{pipeline}: threads left running after close()"
    assert _workers(children) == set(), f"{pipeline}: worker processes left running after close()"
    loader.close()
    loader.close()
    assert sum(len(b.indices) for b in loader) == N  # a later epoch starts again what close() released
    del batches
    loader.close()
    assert _threads_settle_to(threads) and _workers(children) == set()


def test_leaving_with_by_an_exception_ends_the_torch_workers() -> None:
    children = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="stop"), _loader("torch") as loader:
        next(iter(loader))
        workers = _workers(children)
        assert len(workers) == 2
        raise ValueError("stop")
    assert not any(worker.is_alive() for worker in workers)
    assert _workers(children) == set()
