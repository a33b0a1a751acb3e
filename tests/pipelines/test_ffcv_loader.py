"""The ffcv backend: .beton files round-trip every source, and its views equal the device backend's exactly."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_module
from fastmem.pipelines import LoaderOptions, make_loader
from fastmem.pipelines.backends.ffcv import FfcvLoader
from fastmem.pipelines.executors.reference import apply_views
from fastmem.pipelines.ffcv import import_ffcv, main, write_beton
from fastmem.pipelines.params import AugmentSpec, sample_view_params

from fastmem.data import load_arrays
from fastmem.data.synthetic import make_synthetic
from fastmem.errors import FastmemError

try:
    import_ffcv()  # not pytest.importorskip("ffcv"): a bare import would set torch's thread count to 1
except FastmemError as missing:
    pytest.skip(f"FFCV is not installed: {missing}", allow_module_level=True)


def _options(spec: str = "none", **kwargs) -> LoaderOptions:
    return LoaderOptions(spec=AugmentSpec.parse(spec), **kwargs)


def _epoch(loader, epoch: int) -> list:
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_written_beton_returns_every_pixel_and_label(tmp_path: Path, channels: int) -> None:
    data = make_synthetic(300, size=28, channels=channels, seed=1)  # Fashion-MNIST-sized samples
    path = write_beton(data.images, data.labels, tmp_path / "data.beton")
    loader = FfcvLoader(None, None, _options(batch_size=64, shuffle=False, drop_last=False), beton=path)
    batches = list(loader)
    assert len(batches) == len(loader) == 5 and loader.num_samples == 300
    assert torch.equal(torch.cat([b.indices for b in batches]), torch.arange(300))
    pixels = torch.cat([b.images for b in batches]).permute(0, 2, 3, 1).mul(255).round().to(torch.uint8)
    assert torch.equal(pixels, torch.from_numpy(data.images))  # raw storage: identical pixels
    assert torch.equal(torch.cat([b.targets for b in batches]), torch.from_numpy(data.labels))


def test_jpeg_storage_decodes_close_to_the_source(tmp_path: Path) -> None:
    y, x = np.mgrid[0:32, 0:32]
    ramps = [np.stack([4 * x + i, 4 * y + 2 * i, 255 - 3 * (x + y) // 2], axis=-1) for i in range(64)]
    images = np.clip(ramps, 0, 255).astype(np.uint8)  # smooth colour ramps: what JPEG keeps well
    path = write_beton(images, np.zeros(64, np.int64), tmp_path / "jpeg.beton", jpeg_quality=95)
    (batch,) = list(FfcvLoader(None, None, _options(batch_size=64, shuffle=False), beton=path))
    want = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert float((batch.images - want).abs().mean()) < 2 / 255  # a swapped channel would be ~0.3


@pytest.mark.parametrize("spec", ["standard", "full", "strength:0.6", "fullfixed:3:random"])
def test_views_match_the_reference_executor_and_the_device_backend(spec: str) -> None:
    images, targets = make_synthetic(80, size=16, seed=3).images, np.arange(80) % 10
    kwargs = dict(augment=spec, batch_size=24, seed=5, label_seed=2, drop_last=False)
    ffcv, device = make_loader("ffcv", images, targets, **kwargs), make_loader("device", images, targets, **kwargs)
    for f, d in zip(_epoch(ffcv, 4), _epoch(device, 4), strict=True):
        assert torch.equal(f.indices, d.indices) and torch.equal(f.view_ids, d.view_ids)
        assert torch.equal(f.targets, d.targets)
        params = sample_view_params(ffcv.spec, 5, f.indices, f.view_ids, 16, 3)
        reference = apply_views(torch.from_numpy(images[f.indices.numpy()]), params)
        # Both backends run the fastest executor for the device (fused where it applies): the reference
        # executor's pixels up to float rounding, and each other's exactly.
        torch.testing.assert_close(f.images, reference, rtol=0, atol=1e-5)
        assert torch.equal(f.images, d.images)
        assert f.images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_every_sample_once_and_len_matches(tmp_path: Path, world: int) -> None:
    data = make_synthetic(70, size=8, seed=4)
    path = write_beton(data.images, data.labels, tmp_path / "shards.beton")
    seen = []
    for rank in range(world):
        loader = FfcvLoader(None, None, _options(batch_size=8, rank=rank, world=world, drop_last=False), beton=path)
        batches = _epoch(loader, 1)
        assert len(batches) == len(loader)
        seen.append(torch.cat([b.indices for b in batches]))
    assert sorted(torch.cat(seen).tolist()) == list(range(70))
    dropped = FfcvLoader(None, None, _options(batch_size=8, drop_last=True), beton=path)
    assert len(dropped) == 8 and [len(b.indices) for b in dropped] == [8] * 8


def test_epochs_are_deterministic_and_early_breaks_leave_no_thread(tmp_path: Path) -> None:
    data = make_synthetic(96, size=16, seed=5)
    path = write_beton(data.images, data.labels, tmp_path / "epochs.beton")
    loader = FfcvLoader(None, None, _options("full", batch_size=16, seed=1), beton=path)
    first = _epoch(loader, 2)
    threads = threading.active_count()
    for _ in range(3):
        for _ in loader:  # the producer thread is ahead, blocked on its queue
            break
    assert threading.active_count() <= threads
    again = _epoch(loader, 2)
    assert len(again) == len(first) == 6
    for a, b in zip(first, again):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    assert not torch.equal(_epoch(loader, 3)[0].indices, first[0].indices)
    partial = iter(loader)
    next(partial)
    loader.close()  # an epoch abandoned without closing its generator
    assert threading.active_count() <= threads


def test_ffcv_leaves_the_torch_thread_count_alone(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        data = make_synthetic(64, size=8, seed=6)
        loader = FfcvLoader(data.images, data.labels, _options("full", batch_size=16, workers=1))
        _epoch(loader, 1)
        assert torch.get_num_threads() == 2  # FFCV itself sets it to its worker count
    finally:
        torch.set_num_threads(threads)


def test_the_write_command_writes_a_dataset_once(tmp_path: Path) -> None:
    out = tmp_path / "synthetic.beton"
    args = ["write", "--dataset", "synthetic", "--synthetic-size", "200", "--image-size", "16", str(out)]
    done = run_module("fastmem.pipelines.ffcv", *args)
    assert done.returncode == 0, done.stderr
    loader = FfcvLoader(None, None, _options(batch_size=50, shuffle=False), beton=out)
    expected = make_synthetic(200, size=16, seed=0)
    batch = next(iter(loader))
    assert loader.num_samples == 200 and loader.size == (16, 16)
    assert torch.equal(batch.targets, torch.from_numpy(expected.labels[:50]))
    with pytest.raises(FastmemError, match="exists; pass --overwrite"):  # in-process: the CLI's main
        main(args)
    with pytest.raises(SystemExit) as help_exit:
        main(["write", "--help"])
    assert help_exit.value.code == 0


def test_make_loader_reads_an_existing_beton_as_the_source_or_the_beton_option(tmp_path: Path) -> None:
    data = make_synthetic(70, size=8, seed=4)
    path = write_beton(data.images, data.labels, tmp_path / "given.beton")
    kwargs = dict(augment="full", batch_size=16, seed=2)
    as_source, as_option = make_loader("ffcv", path, **kwargs), make_loader("ffcv", None, beton=str(path), **kwargs)
    device = make_loader("device", data.images, data.labels, **kwargs)
    assert as_source.path == as_option.path == path
    for a, b, d in zip(_epoch(as_source, 1), _epoch(as_option, 1), _epoch(device, 1), strict=True):
        assert torch.equal(a.indices, d.indices) and torch.equal(a.targets, d.targets)  # the file's labels
        assert torch.equal(a.images, d.images) and torch.equal(b.images, d.images)
    for args, kw, message in [
        (("device", path), {}, "the device pipeline reads no .beton file; the ffcv pipeline does"),
        (("ffcv", path), dict(beton=path), "as the source or as beton=, not both"),
        (("ffcv", None), {}, "a source is required"),
        (("ffcv", data.images, data.labels), dict(bogus=1), "has no option 'bogus'; it takes beton, jpeg_quality"),
    ]:
        with pytest.raises(FastmemError, match=message) as err:
            make_loader(*args, **kw, batch_size=16)
        assert "\n" not in str(err.value)


def test_user_mistakes_and_missing_ffcv_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FastmemError, match="no such .beton"):
        FfcvLoader(None, None, _options(), beton=tmp_path / "missing.beton")
    (tmp_path / "junk.beton").write_bytes(b"\0" * 64)
    with pytest.raises(FastmemError, match="not a readable FFCV .beton"):
        FfcvLoader(None, None, _options(), beton=tmp_path / "junk.beton")
    with pytest.raises(FastmemError, match="JPEG storage needs 3-channel"):
        write_beton(np.zeros((4, 8, 8, 1), np.uint8), np.zeros(4, np.int64), tmp_path / "a.beton", jpeg_quality=90)
    monkeypatch.setitem(sys.modules, "ffcv", None)
    with pytest.raises(FastmemError, match=r"pip install -e \.\[ffcv\]") as err:
        import_ffcv()
    assert "\n" not in str(err.value)


def test_an_epoch_of_a_fashion_mnist_subset(tmp_path: Path) -> None:
    try:
        data = load_arrays("fashion-mnist", "train")
    except FastmemError as err:
        pytest.skip(f"Fashion-MNIST is not installed here: {err}")
    subset = data.subset(np.arange(2000))
    path = write_beton(subset.images, subset.labels, tmp_path / "fmnist.beton")
    loader = FfcvLoader(None, None, _options("full", batch_size=256), beton=path)
    batches = list(loader)
    assert len(batches) == len(loader) == 7
    assert all(b.images.shape == (256, 1, 28, 28) for b in batches)
    assert len(set(torch.cat([b.indices for b in batches]).tolist())) == 7 * 256
    assert torch.equal(batches[0].targets, torch.as_tensor(subset.labels)[batches[0].indices])


def test_a_stale_iterator_fails_instead_of_hanging(tmp_path: Path) -> None:
    data = make_synthetic(64, size=8, seed=7)
    loader = FfcvLoader(data.images, data.labels, _options(batch_size=16))
    stale = iter(loader)
    next(stale)
    assert len(list(loader)) == 4  # closes the stale epoch's FFCV thread
    with pytest.raises(RuntimeError, match="stale"):
        next(stale)
