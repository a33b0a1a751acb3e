"""The dali backend executes the sampler's parameters: geometry exact, colour within the stated tolerances.

Tolerances are those of pipelines/backends/dali.py's docstring (DALI's fused colour ops clamp once and
rotate hue in YIQ; torchvision clamps after each op and shifts hue in HSV). Runs CPU-only (`device_id=None`).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fastmem.pipelines import LoaderOptions, make_loader
from fastmem.pipelines.executors.reference import apply_views
from fastmem.pipelines.params import AugmentSpec, ViewParams, sample_view_params
from PIL import Image

from fastmem.data import load_arrays
from fastmem.data.imagefolder import decode_files, load_imagefolder
from fastmem.data.synthetic import make_synthetic
from fastmem.errors import FastmemError

pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install -e .[dali])")
from fastmem.pipelines.backends.dali import DaliLoader, import_dali  # noqa: E402

EPS = 1e-5
TOLERANCE = {  # mean |Δ| over all pixels (and max |Δ| where it is tight), in [0, 1] units
    "geometry": (EPS, EPS), "grayscale": (1 / 255, 1 / 255), "brightness": (1 / 255, 1 / 255),
    "contrast": (1 / 255, 1 / 255), "saturation": (1 / 255, 1 / 255), "brightness+contrast+saturation": (0.02, 1.0),
    "hue": (0.08, 1.0), "full": (0.06, 1.0),
}


def _synthetic(n: int = 256, size: int = 32, channels: int = 3) -> np.ndarray:
    return make_synthetic(n, size=size, channels=channels, seed=4).images


def _loader(images: np.ndarray, spec: str = "full", **options) -> DaliLoader:
    targets = np.arange(len(images)) % 10
    return DaliLoader(images, targets, LoaderOptions(spec=AugmentSpec.parse(spec), **options))


def _single_effects(p: ViewParams) -> dict[str, ViewParams]:
    """The sampled views with all but one effect switched off (jitter forced on where it is tested)."""
    n = len(p)
    on, off = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(n, 1)

    def only(k: int) -> ViewParams:
        factors = identity.clone()
        factors[:, k] = p.factors[:, k]
        return replace(p, jitter=on, factors=factors, grayscale=off)

    no_hue = p.factors.clone()
    no_hue[:, 3] = 0.0
    return {
        "geometry": replace(p, jitter=off, grayscale=off), "grayscale": replace(p, jitter=off, grayscale=on),
        "brightness": only(0), "contrast": only(1), "saturation": only(2), "hue": only(3),
        "brightness+contrast+saturation": replace(p, jitter=on, factors=no_hue, grayscale=off), "full": p,
    }


@pytest.mark.parametrize("channels", [3, 1])
def test_same_parameters_give_the_reference_pixels_within_the_stated_tolerance(channels: int) -> None:
    images = _synthetic(128, 32, channels)
    loader = _loader(images, batch_size=128)
    indices = torch.arange(128)
    params = sample_view_params(loader.spec, 11, indices, torch.full((128,), 5), 32, channels)
    for effect, view_params in _single_effects(params).items():
        got = loader.execute(indices, view_params)
        want = apply_views(torch.from_numpy(images), view_params)
        diff = (got - want).abs()
        mean_tol, max_tol = TOLERANCE[effect]
        assert float(diff.mean()) <= mean_tol and float(diff.max()) <= max_tol, (effect, diff.mean(), diff.max())
        assert float(got.min()) >= 0.0 and float(got.max()) <= 1.0


@pytest.mark.parametrize("spec", ["none", "standard"])
def test_geometric_specs_equal_the_device_backend(spec: str) -> None:
    images, targets = _synthetic(90, 16), np.arange(90) % 7
    kwargs = dict(augment=spec, batch_size=32, seed=2, drop_last=False)
    dali, device = make_loader("dali", images, targets, **kwargs), make_loader("device", images, targets, **kwargs)
    for loader in (dali, device):
        loader.set_epoch(3)
    for d, ref in zip(dali, device, strict=True):
        assert torch.equal(d.indices, ref.indices) and torch.equal(d.view_ids, ref.view_ids)
        assert torch.equal(d.targets, ref.targets)
        torch.testing.assert_close(d.images, ref.images, rtol=0, atol=EPS)


def test_full_views_follow_the_sampler_and_fixed_random_labels() -> None:
    images, targets = _synthetic(64, 16), np.arange(64) % 10
    kwargs = dict(augment="fullfixed:3:random", batch_size=16, seed=6, label_seed=8)
    dali, device = make_loader("dali", images, targets, **kwargs), make_loader("device", images, targets, **kwargs)
    for d, ref in zip(dali, device, strict=True):
        assert torch.equal(d.indices, ref.indices) and torch.equal(d.view_ids, ref.view_ids)
        assert torch.equal(d.targets, ref.targets)
        assert float((d.images - ref.images).abs().mean()) <= TOLERANCE["full"][0]
        assert d.images.is_contiguous(memory_format=torch.channels_last) and d.images.dtype == torch.float32


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_every_sample_once_and_len_matches(world: int) -> None:
    images = _synthetic(70, 8)
    loaders = [make_loader("dali", images, np.zeros(70, dtype=np.int64), augment="standard", batch_size=8,
                           rank=r, world=world, drop_last=False) for r in range(world)]
    seen = []
    for loader in loaders:
        batches = list(loader)
        assert len(batches) == len(loader)
        seen.append(torch.cat([b.indices for b in batches]))
    assert sorted(torch.cat(seen).tolist()) == list(range(70))
    dropped = make_loader("dali", images, np.zeros(70, dtype=np.int64), batch_size=8, drop_last=True)
    assert len(dropped) == 8 and all(len(b.indices) == 8 for b in dropped)


def test_epochs_are_deterministic_and_an_early_break_leaves_no_stale_batch() -> None:
    images = _synthetic(96, 16)
    loader = make_loader("dali", images, np.zeros(96, dtype=np.int64), batch_size=16, seed=1)
    loader.set_epoch(2)
    first = list(loader)
    for _ in loader:  # stops with batches still scheduled in DALI's queue
        break
    again = list(loader)
    assert len(again) == len(first) == 6
    for a, b in zip(first, again):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    loader.set_epoch(3)
    assert not torch.equal(next(iter(loader)).indices, first[0].indices)


def _image_folder(root: Path, images: np.ndarray) -> None:
    """An ImageFolder tree: root/train/class{i % 2}/{i}.png."""
    for i, image in enumerate(images):
        folder = root / "train" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")


def test_image_files_decode_to_the_same_views_as_the_array_source(tmp_path: Path) -> None:
    _image_folder(tmp_path, _synthetic(24, 40))
    files = load_imagefolder(tmp_path, "train")
    arrays = decode_files(files, 32)  # the arrays every other backend gets: PIL bilinear to 32×32
    options = LoaderOptions(spec=AugmentSpec.parse("standard"), batch_size=8, seed=3, drop_last=False)
    from_files = DaliLoader(files, files.labels, options, image_size=32)
    from_arrays = DaliLoader(arrays.images, arrays.labels, options)
    for f, a in zip(from_files, from_arrays, strict=True):
        assert torch.equal(f.indices, a.indices) and torch.equal(f.targets, a.targets)
        assert float((f.images - a.images).abs().mean()) <= 2 / 255  # DALI's resize vs PIL's, one rounding each


def test_make_loader_hands_an_image_folder_or_file_list_to_dalis_decoder(tmp_path: Path) -> None:
    _image_folder(tmp_path, _synthetic(24, 40))
    files = load_imagefolder(tmp_path, "train")
    kwargs = dict(augment="standard", batch_size=8, seed=3, drop_last=False)
    from_folder = make_loader("dali", str(tmp_path), image_size=32, **kwargs)
    from_list = make_loader("dali", files, image_size=32, **kwargs)
    direct = DaliLoader(files, files.labels, LoaderOptions(spec=AugmentSpec.parse("standard"), batch_size=8, seed=3,
                                                           drop_last=False), image_size=32)
    assert from_folder.files == from_list.files == files.files and from_folder.size == (32, 32)
    for a, b, c in zip(from_folder, from_list, direct, strict=True):
        assert torch.equal(a.indices, c.indices) and torch.equal(a.targets, c.targets)
        assert torch.equal(a.images, c.images) and torch.equal(b.images, c.images)
    with pytest.raises(FastmemError, match="the dali pipeline has no option 'beton'; it takes image_size, channels"):
        make_loader("dali", files, beton="x.beton", **kwargs)
    with pytest.raises(FastmemError, match="dali option image_size= must be int, got str '32'"):
        make_loader("dali", files, image_size="32", **kwargs)


def test_a_corrupt_image_file_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(FastmemError) as err:  # the warm-up run at construction decodes the first batch
        DaliLoader([str(tmp_path / "bad.jpg")], np.zeros(1, dtype=np.int64),
                   LoaderOptions(spec=AugmentSpec.parse("none"), batch_size=1), image_size=8)
    assert str(err.value).startswith("dali: ") and "\n" not in str(err.value)


def test_randaugment_and_missing_dali_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FastmemError, match=r"the dali pipeline does not execute strength:0.5 \(randaugment\); "
                                           "use --pipeline device, torch or ffcv"):
        make_loader("dali", _synthetic(32, 8), np.zeros(32, dtype=np.int64), augment="strength:0.5", batch_size=8)
    with pytest.raises(FastmemError, match="does not execute strength:0.5"):  # built directly: the same check
        _loader(_synthetic(32, 8), "strength:0.5", batch_size=8)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(FastmemError, match=r"pip install -e \.\[dali\]") as err:
        import_dali()
    assert "\n" not in str(err.value)


def test_an_epoch_of_a_fashion_mnist_subset() -> None:
    try:
        data = load_arrays("fashion-mnist", "train")
    except FastmemError as err:
        pytest.skip(f"Fashion-MNIST is not installed here: {err}")
    subset = data.subset(np.arange(2000))
    loader = make_loader("dali", subset, augment="full", batch_size=256, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 7
    assert all(b.images.shape == (256, 1, 28, 28) for b in batches)
    assert len(set(torch.cat([b.indices for b in batches]).tolist())) == 7 * 256
    assert torch.equal(batches[0].targets, torch.as_tensor(subset.labels)[batches[0].indices])


def test_a_stale_iterator_neither_steals_nor_discards_a_newer_epochs_batches() -> None:
    loader = make_loader("dali", _synthetic(64, 8), np.zeros(64, dtype=np.int64), batch_size=16, seed=2)
    stale = iter(loader)
    next(stale)
    fresh = list(loader)  # starts while `stale` still has batches scheduled
    assert len(fresh) == 4 and sorted(torch.cat([b.indices for b in fresh]).tolist()) == list(range(64))
    with pytest.raises(RuntimeError, match="stale"):
        next(stale)
