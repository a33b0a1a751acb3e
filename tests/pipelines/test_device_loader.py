"""Every backend honours the contract; device and torch backends yield the same views; sharding and fixed views."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastmem.pipelines import BACKENDS, PIPELINE_NAMES, AugmentSpec, PipelineEntry, make_loader
from PIL import Image

from fastmem.data.types import ArrayDataset
from fastmem.errors import FastmemError

SPECS = ["none", "standard", "full", "strength:0.6", "fullfixed:3:random"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # defined in conftest.py


def _images(n: int = 60, size: int = 12, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def _targets(n: int = 60) -> np.ndarray:
    return np.arange(n) % 10


def _epoch(loader, epoch: int) -> list:
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("pipeline", PIPELINE_NAMES)
@pytest.mark.parametrize("spec", SPECS)
def test_every_backend_yields_contract_batches(pipeline: str, spec: str) -> None:
    try:
        loader = make_loader(pipeline, _images(), _targets(), augment=spec, batch_size=16, seed=3)
    except FastmemError as err:  # a backend may execute only some specs, and says so in one line
        pytest.skip(f"{pipeline} refuses {spec}: {err}")
    batches = _epoch(loader, 2)
    assert len(batches) == len(loader) == 3 and loader.spec == AugmentSpec.parse(spec)
    assert loader.num_views == AugmentSpec.parse(spec).num_views
    for b in batches:
        assert b.images.shape == (16, 3, 12, 12) and b.images.dtype == torch.float32
        assert b.images.is_contiguous(memory_format=torch.channels_last)
        assert 0.0 <= float(b.images.min()) and float(b.images.max()) <= 1.0
        assert b.targets.dtype == b.indices.dtype == b.view_ids.dtype == torch.int64
        if spec != "fullfixed:3:random":
            assert torch.equal(b.targets, torch.as_tensor(_targets())[b.indices])
    assert len(set(torch.cat([b.indices for b in batches]).tolist())) == 48


@pytest.mark.parametrize("spec", SPECS)
def test_device_and_torch_backends_yield_the_same_views(spec: str) -> None:
    def run(pipeline: str) -> list:
        return _epoch(make_loader(pipeline, _images(40, 13), _targets(40), augment=spec, batch_size=8, seed=5,
                                  drop_last=False), 4)

    for d, t in zip(run("device"), run("torch"), strict=True):
        assert torch.equal(d.indices, t.indices) and torch.equal(d.view_ids, t.view_ids)
        assert torch.equal(d.targets, t.targets)
        # The device backend runs the fused executor, the torch baseline the reference one: equal up
        # to float rounding (the fused executors' contract allows 1e-5 geometry, 2/255 colour).
        torch.testing.assert_close(d.images, t.images, rtol=0, atol=1e-5)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shards_cover_every_sample_once_per_epoch(world: int, drop_last: bool) -> None:
    n, batch = 103, 8
    loaders = [make_loader("device", _images(n, 4), _targets(n), augment="none", batch_size=batch, seed=1,
                           rank=r, world=world, drop_last=drop_last) for r in range(world)]
    seen = [torch.cat([b.indices for b in _epoch(loader, 6)]) for loader in loaders]
    everything = torch.cat(seen)
    assert len(set(everything.tolist())) == len(everything)  # no sample twice
    if drop_last:
        assert len({len(loader) for loader in loaders}) == 1 and len(loaders[0]) == (n // world) // batch
        assert len(everything) == world * len(loaders[0]) * batch
    else:
        assert sorted(everything.tolist()) == list(range(n))
        assert [len(loader) for loader in loaders] == [-(-len(s) // batch) for s in seen]


def test_epochs_are_reproducible_and_differ_from_each_other() -> None:
    def epoch(e: int) -> list:
        return _epoch(make_loader("device", _images(), _targets(), augment="full", batch_size=20, seed=2), e)

    a, b, c = epoch(3), epoch(3), epoch(4)
    assert all(torch.equal(x.images, y.images) and torch.equal(x.indices, y.indices) for x, y in zip(a, b))
    assert not torch.equal(a[0].indices, c[0].indices)
    ordered = _epoch(make_loader("device", _images(), _targets(), augment="none", batch_size=20, shuffle=False), 3)
    assert torch.equal(torch.cat([x.indices for x in ordered]), torch.arange(60))


def test_fixed_views_give_exactly_n_views_per_sample_with_stable_random_labels() -> None:
    n_samples, n_views = 24, 3
    loader = make_loader("device", _images(n_samples), _targets(n_samples), augment=f"fullfixed:{n_views}:random",
                         batch_size=n_samples, seed=7, label_seed=9)
    views: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
    for epoch in range(40):
        (batch,) = _epoch(loader, epoch)
        for image, index, view, target in zip(batch.images, batch.indices.tolist(), batch.view_ids.tolist(),
                                              batch.targets.tolist()):
            if (index, view) in views:
                earlier, label = views[index, view]
                assert torch.equal(earlier, image) and label == target  # the same view, the same label
            views[index, view] = (image, target)
    for index in range(n_samples):
        mine = [views[index, v][0] for v in range(n_views)]  # every view id seen (KeyError otherwise)
        assert all(not torch.equal(mine[a], mine[b]) for a in range(n_views) for b in range(a))
    labels = np.array([[views[i, v][1] for v in range(n_views)] for i in range(n_samples)])
    assert (labels != labels[:, :1]).any()  # labels differ between views of a sample


def test_sources_by_name_dataset_and_image_folder(tmp_path: Path) -> None:
    data = ArrayDataset(_images(40, 8), _targets(40), tuple("abcdefghij"), "arrays")
    batch = next(iter(make_loader("device", data, augment="standard", batch_size=8)))
    assert torch.equal(batch.targets, torch.as_tensor(data.labels)[batch.indices])
    named = make_loader("device", "synthetic", augment="full", batch_size=64)
    assert next(iter(named)).images.shape == (64, 3, 32, 32)
    for colour in ["red", "blue"]:
        (tmp_path / "train" / colour).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (10, 10), colour).save(tmp_path / "train" / colour / f"{i}.png")
    folder = list(make_loader("torch", str(tmp_path), augment="none", batch_size=5, shuffle=False))
    assert [b.targets.tolist() for b in folder] == [[0] * 5, [1] * 5]
    assert folder[0].images.shape == (5, 3, 64, 64)


def test_dtype_memory_format_and_num_classes() -> None:
    loader = make_loader("device", _images(), _targets(), batch_size=16, dtype=torch.bfloat16, channels_last=False)
    batch = next(iter(loader))
    assert batch.images.dtype == torch.bfloat16 and batch.images.is_contiguous()
    labels = make_loader("device", _images(), _targets(), augment="fullfixed:2:random", batch_size=60, num_classes=1000)
    assert int(next(iter(labels)).targets.max()) >= 10


@pytest.mark.parametrize("kwargs, message", [
    (dict(pipeline="nope"), "unknown pipeline 'nope'"),
    (dict(augment="fancy"), "unknown augmentation 'fancy'"),
    (dict(batch_size=32, world=2), "30 samples per rank .2 ranks., fewer than one batch of 32"),
    (dict(rank=2, world=2), "rank 2 is not in"),
    (dict(dtype=torch.int32), "dtype must be one of"),
    (dict(source=np.zeros((60, 12, 12, 3), dtype=np.float32)), "images must be uint8 NHWC"),
    (dict(targets=np.zeros(5, dtype=np.int64)), "5 targets for 60 images"),
    (dict(source="no-such-dataset"), "unknown dataset 'no-such-dataset'"),
])
def test_user_mistakes_are_one_line_errors(kwargs: dict, message: str) -> None:
    args = dict(pipeline="device", source=_images(), targets=_targets(), batch_size=16) | kwargs
    with pytest.raises(FastmemError, match=message) as err:
        make_loader(args.pop("pipeline"), args.pop("source"), args.pop("targets"), **args)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_cuda_requested_without_cuda_is_a_user_error() -> None:
    with pytest.raises(FastmemError, match="CUDA is not available"):
        make_loader("device", _images(), _targets(), batch_size=16, device="cuda")


def test_a_missing_optional_dependency_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "needs_dep_backend.py").write_text("import fastmem_test_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(BACKENDS, "fake", PipelineEntry("needs_dep_backend", "Loader", "a test backend", extra="dali"))
    with pytest.raises(FastmemError, match=r"needs 'fastmem_test_missing_dependency'.*pip install -e \.\[dali\]"):
        make_loader("fake", _images(), _targets())
    sys.modules.pop("needs_dep_backend", None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("spec", ["full", "fullfixed:4:random"])
def test_cuda_device_loader_matches_cpu(spec: str) -> None:
    def run(device: str) -> list:
        return _epoch(make_loader("device", _images(600, 16), _targets(600), augment=spec, batch_size=64, seed=1,
                                  device=device), 2)

    for c, g in zip(run("cpu"), run("cuda"), strict=True):
        assert g.images.device.type == "cuda" and torch.equal(c.indices, g.indices.cpu())
        assert torch.equal(c.targets, g.targets.cpu()) and torch.equal(c.view_ids, g.view_ids.cpu())
        torch.testing.assert_close(c.images, g.images.cpu(), rtol=0, atol=1e-5)
