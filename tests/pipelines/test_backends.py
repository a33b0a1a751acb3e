"""The loader contract, checked on every registered backend, and the registry's capability check in the trainer.

Each backend is built through `make_loader` on a small synthetic uint8 array; a backend is skipped only when
its optional dependency (its registry entry's extra) is not installed, and the skip says why.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_module
from fastmem.pipelines import BACKENDS, PIPELINE_NAMES, AugmentSpec, make_loader
from fastmem.pipelines.params import view_ids_for
from fastmem.pipelines.sharding import batch_bounds, epoch_order, shard

from fastmem.errors import FastmemError

N, SIZE, BATCH, CLASSES = 50, 10, 8, 5
SPECS = ["none", "standard", "full", "fullfixed:2:random", "strength:0.6"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # defined in conftest.py


def _images(channels: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (N, SIZE, SIZE, channels), dtype=np.uint8)


def _targets() -> np.ndarray:
    return np.arange(N) % CLASSES


def _loader(pipeline: str, **kwargs):
    """make_loader on the synthetic array; skips (saying why) only when the backend's extra is missing."""
    try:
        return make_loader(pipeline, _images(kwargs.pop("channels", 3)), _targets(), **kwargs)
    except FastmemError as err:
        extra = BACKENDS[pipeline].extra
        if extra and f".[{extra}]" in str(err):
            pytest.skip(f"the {pipeline} pipeline's extra is not installed: {err}")
        raise


def _epoch(loader, epoch: int) -> list:
    loader.set_epoch(epoch)
    return list(loader)


def _cases() -> list:
    """(pipeline, spec) for every spec each backend's registry entry says it executes."""
    return [pytest.param(name, spec, id=f"{name}-{spec}") for name in PIPELINE_NAMES for spec in SPECS
            if AugmentSpec.parse(spec).kind in BACKENDS[name].kinds]


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                  reason="needs a CUDA GPU")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("pipeline", "spec"), _cases())
def test_every_backend_yields_contract_batches(pipeline: str, spec: str, device: str) -> None:
    loader = _loader(pipeline, augment=spec, batch_size=BATCH, seed=3, label_seed=4, device=device)
    parsed = AugmentSpec.parse(spec)
    assert loader.spec == parsed and loader.num_views == parsed.num_views
    batches = _epoch(loader, 2)
    assert len(batches) == len(loader) == N // BATCH
    mine, bounds = shard(epoch_order(N, 3, 2), 0, 1), batch_bounds(N, BATCH, 0, 1, True)
    for batch, (lo, hi) in zip(batches, bounds, strict=True):
        assert batch.images.shape == (BATCH, 3, SIZE, SIZE) and batch.images.dtype == torch.float32
        assert batch.images.is_contiguous(memory_format=torch.channels_last)
        assert 0.0 <= float(batch.images.min()) and float(batch.images.max()) <= 1.0
        for tensor in batch:
            assert tensor.device.type == device
        assert batch.targets.dtype == batch.indices.dtype == batch.view_ids.dtype == torch.int64
        assert torch.equal(batch.indices.cpu(), mine[lo:hi])  # the shared order: the same on every backend
        assert torch.equal(batch.view_ids.cpu(), view_ids_for(parsed, 3, 2, mine[lo:hi]))
        if parsed.view_labels == "random" and parsed.fixed:
            assert 0 <= int(batch.targets.min()) and int(batch.targets.max()) < CLASSES
        else:
            assert torch.equal(batch.targets.cpu(), torch.as_tensor(_targets())[batch.indices.cpu()])
    seen = torch.cat([b.indices for b in batches]).tolist()
    assert len(set(seen)) == len(seen)  # each sample at most once per epoch


@pytest.mark.parametrize("pipeline", PIPELINE_NAMES)
def test_dtype_memory_format_channels_and_shards_without_drop_last(pipeline: str) -> None:
    loaders = [_loader(pipeline, augment="standard", batch_size=BATCH, seed=1, dtype=torch.bfloat16, channels_last=False,
                       drop_last=False, rank=rank, world=2, channels=1) for rank in range(2)]
    seen = []
    for loader in loaders:
        batches = _epoch(loader, 1)
        assert len(batches) == len(loader) == -(-(N // 2) // BATCH)
        for batch in batches:
            assert batch.images.dtype == torch.bfloat16 and batch.images.is_contiguous()
            assert batch.images.shape[1:] == (1, SIZE, SIZE)
        seen += torch.cat([b.indices for b in batches]).tolist()
    assert sorted(seen) == list(range(N))  # every sample exactly once per epoch across the ranks


@pytest.mark.parametrize("pipeline", PIPELINE_NAMES)
def test_set_epoch_changes_the_views_and_an_epoch_is_reproducible(pipeline: str) -> None:
    loader = _loader(pipeline, augment="full", batch_size=BATCH, seed=2, shuffle=False)
    first, again, other = _epoch(loader, 1), _epoch(loader, 1), _epoch(loader, 2)
    for a, b, c in zip(first, again, other, strict=True):
        assert torch.equal(a.indices, c.indices) and torch.equal(a.images, b.images)
        assert not torch.equal(a.view_ids, c.view_ids)
        changed = (a.images - c.images).abs().flatten(1).amax(1) > 0
        assert bool(changed.all()), "a fresh epoch must give every sample a fresh view"
    shuffled = _loader(pipeline, augment="none", batch_size=BATCH, seed=2)
    assert not torch.equal(_epoch(shuffled, 1)[0].indices, _epoch(shuffled, 2)[0].indices)


def test_the_same_seed_and_epoch_give_the_same_indices_on_every_backend() -> None:
    orders = {}
    for pipeline in PIPELINE_NAMES:
        try:
            loader = make_loader(pipeline, _images(), _targets(), augment="none", batch_size=BATCH, seed=9, drop_last=False)
        except FastmemError as err:  # an extra that is not installed
            print(f"skipping {pipeline}: {err}")
            continue
        orders[pipeline] = torch.cat([b.indices for b in _epoch(loader, 5)])
    assert len(orders) >= 2
    reference = orders.pop("device")
    assert sorted(reference.tolist()) == list(range(N))
    for pipeline, order in orders.items():
        assert torch.equal(order, reference), pipeline


TRIPWIRE = '''"""Run the trainer with its data loading replaced by a tripwire."""
import runpy
import sys

import fastmem.data.splits


def _tripwire(*args, **kwargs):
    sys.exit("tripwire: the trainer started loading data")


fastmem.data.splits.load_run_splits = _tripwire
runpy.run_module("fastmem.train", run_name="__main__", alter_sys=True)
'''


def test_the_trainer_refuses_a_spec_its_pipeline_cannot_execute_before_loading_any_data(tmp_path: Path) -> None:
    (tmp_path / "tripwire_train.py").write_text(TRIPWIRE)
    common = ["--augment", "strength:0.5", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "no-data"),
              "--device", "cpu", "--out", str(tmp_path / "run")]
    started = time.perf_counter()
    refused = run_module("tripwire_train", "--pipeline", "dali", *common, cwd=tmp_path)
    seconds = time.perf_counter() - started
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr == ("fastmem: error: the dali pipeline does not execute strength:0.5 (randaugment); "
                              "use --pipeline device, torch or ffcv\n")
    print(f"refused in {seconds:.1f} s (interpreter and imports included)")
    assert seconds < 60
    # The same command on a pipeline that executes RandAugment goes on to load the data: the tripwire fires.
    accepted = run_module("tripwire_train", "--pipeline", "torch", *common, cwd=tmp_path)
    assert accepted.returncode == 1 and "tripwire: the trainer started loading data" in accepted.stderr
    assert not (tmp_path / "run" / "config.json").exists() and not (tmp_path / "no-data").exists()
