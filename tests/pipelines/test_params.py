"""The parameter sampler: counter RNG, specs, and view statistics checked against torchvision's own samplers."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from fastmem.pipelines.params import (
    RA_OPS,
    AugmentSpec,
    epoch_permutation,
    ra_magnitude_table,
    sample_view_params,
    view_ids_for,
    view_targets,
)
from fastmem.pipelines.rng import counter_bits, counter_randint, counter_uniform
from torchvision.transforms import v2

from fastmem.errors import FastmemError

N_VIEWS = 20_000


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: thread wake-ups cost more than they save on a busy 2-core machine
    yield
    torch.set_num_threads(threads)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


KS_LIMIT = 0.025  # ≈ the 0.1% critical value for two samples of 20k (1.95·sqrt(2/20000) = 0.0195), with slack


def _splitmix_np(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def test_counter_rng_matches_a_uint64_reference_bit_for_bit() -> None:
    seed, stream = 123456789, 7
    indices = np.array([0, 1, 2, 2**40 + 3, 2**62], dtype=np.int64)
    views = np.array([0, 5, 2**33, 9, 1], dtype=np.int64)
    key = _splitmix_np(np.array([seed], dtype=np.uint64))
    with np.errstate(over="ignore"):
        base = _splitmix_np(key + np.uint64(stream))
        expected = _splitmix_np(_splitmix_np(base + indices.astype(np.uint64)) + views.astype(np.uint64))
    got = counter_bits(seed, torch.from_numpy(indices), torch.from_numpy(views), stream).numpy().view(np.uint64)
    np.testing.assert_array_equal(got, expected)
    tensor_stream = counter_bits(seed, torch.from_numpy(indices), torch.from_numpy(views), torch.tensor([[stream]]))
    assert torch.equal(tensor_stream[0], torch.from_numpy(got.view(np.int64)))


def test_counter_rng_is_a_pure_function_of_its_key_and_uniform() -> None:
    indices = torch.arange(100_000)
    a = counter_uniform(3, indices, 7, 1)
    assert torch.equal(a, counter_uniform(3, indices.clone(), torch.full_like(indices, 7), 1))
    assert a.dtype == torch.float32 and 0.0 <= float(a.min()) and float(a.max()) < 1.0
    grid = np.linspace(0, 1, 100_000, endpoint=False)
    assert ks_statistic(a.numpy(), grid) < 0.01
    assert not torch.equal(a, counter_uniform(4, indices, 7, 1))
    ints = counter_randint(3, indices, 7, 2, 10)
    assert set(ints.unique().tolist()) == set(range(10))
    assert np.abs(np.bincount(ints.numpy()) / len(ints) - 0.1).max() < 0.01


@pytest.mark.parametrize("other", [dict(stream=2), dict(view=8), dict(seed=4), dict(shift=1)])
def test_counter_streams_views_seeds_and_neighbours_are_decorrelated(other: dict) -> None:
    indices = torch.arange(100_000)
    a = counter_uniform(3, indices, 7, 1).double()
    b = counter_uniform(other.get("seed", 3), indices + other.get("shift", 0), other.get("view", 7), other.get("stream", 1)).double()
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.015
    assert float((a == b).double().mean()) < 1e-3


def test_epoch_permutation_is_a_seeded_shuffle() -> None:
    p = epoch_permutation(1000, seed=1, epoch=2)
    assert torch.equal(p.sort().values, torch.arange(1000))
    assert torch.equal(p, epoch_permutation(1000, seed=1, epoch=2))
    assert not torch.equal(p, epoch_permutation(1000, seed=1, epoch=3))
    assert not torch.equal(p, epoch_permutation(1000, seed=2, epoch=2))


@pytest.mark.parametrize("text, expected", [
    ("none", AugmentSpec("none")), ("standard", AugmentSpec("standard")), (" FULL ", AugmentSpec("full")),
    ("strength:0.5", AugmentSpec("strength", strength=0.5)), ("strength:1", AugmentSpec("strength", strength=1.0)),
    ("fullfixed:5", AugmentSpec("full", views=5)), ("fullfixed:3:random", AugmentSpec("full", views=3, view_labels="random")),
    ("fullfixed_2", AugmentSpec("full", views=2)),
])
def test_spec_parses_every_documented_form(text: str, expected: AugmentSpec) -> None:
    spec = AugmentSpec.parse(text)
    assert spec == expected and AugmentSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text", ["fancy", "strength:1.5", "strength:", "fullfixed:0", "fullfixed:3:other", "full:2"])
def test_bad_spec_text_is_a_one_line_user_error(text: str) -> None:
    with pytest.raises(FastmemError, match="unknown augmentation") as err:
        AugmentSpec.parse(text)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("strength, ops, magnitude", [(0.0, 1, 0), (0.3, 2, 30), (0.5, 2, 50), (0.9, 4, 90), (1.0, 4, 99)])
def test_strength_maps_to_randaugment_as_the_protocol_says(strength: float, ops: int, magnitude: int) -> None:
    spec = AugmentSpec.parse(f"strength:{strength}")
    assert (spec.num_ops, spec.magnitude) == (ops, magnitude) == (int(strength * 10 // 3 + 1), min(int(100 * strength), 99))


def _views(spec: str, size: tuple[int, int] = (32, 32), channels: int = 3, n: int = N_VIEWS):
    s = AugmentSpec.parse(spec)
    indices = torch.arange(n)
    return sample_view_params(s, 5, indices, view_ids_for(s, 5, 3, indices), size, channels)


def _torchvision_crops(size: tuple[int, int], n: int) -> np.ndarray:
    torch.manual_seed(0)
    image = torch.zeros(1, *size)
    return np.array([T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_crop_boxes_follow_torchvision_random_resized_crop(size: tuple[int, int]) -> None:
    ours = _views("full", size).crop.numpy()
    theirs = _torchvision_crops(size, N_VIEWS)
    h, w = size
    assert (ours[:, 2:] >= 1).all() and (ours[:, 0] + ours[:, 2] <= h).all() and (ours[:, 1] + ours[:, 3] <= w).all()
    for name, f in {
        "area": lambda c: c[:, 2] * c[:, 3] / (h * w), "aspect": lambda c: c[:, 3] / c[:, 2],
        "top": lambda c: c[:, 0], "left": lambda c: c[:, 1], "height": lambda c: c[:, 2],
    }.items():
        assert ks_statistic(f(ours), f(theirs)) < KS_LIMIT, name


def test_flip_jitter_and_grayscale_rates_and_factor_ranges_match_the_protocol() -> None:
    p = _views("full")
    for flag, rate in ((p.flip, 0.5), (p.jitter, 0.8), (p.grayscale, 0.2)):
        assert abs(float(flag.float().mean()) - rate) < 0.015
    torch.manual_seed(0)
    ranges = ((0.2, 1.8), (0.2, 1.8), (0.2, 1.8), (-0.2, 0.2))
    theirs = [T.ColorJitter.get_params(*ranges) for _ in range(N_VIEWS)]
    for i, (lo, hi) in enumerate(ranges):
        ours = p.factors[:, i].numpy()
        assert lo <= ours.min() and ours.max() <= hi
        assert ks_statistic(ours, np.array([t[1 + i] for t in theirs])) < KS_LIMIT
    orders = [tuple(o) for o in p.order.tolist()]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    counts = np.array([orders.count(o) for o in set(orders)])
    assert len(counts) == 24 and np.abs(counts / N_VIEWS - 1 / 24).max() < 0.006


def test_standard_translations_are_uniform_over_the_reflect_padding() -> None:
    p = _views("standard")
    pad = 32 // 8
    offsets = p.crop[:, :2].numpy()
    assert (p.crop[:, 2:] == 32).all()
    freq = np.bincount((offsets + pad).ravel(), minlength=2 * pad + 1) / offsets.size
    assert len(freq) == 2 * pad + 1 and np.abs(freq - 1 / (2 * pad + 1)).max() < 0.01
    assert abs(float(p.flip.float().mean()) - 0.5) < 0.015
    assert not p.jitter.any() and not p.grayscale.any()


def test_none_draws_nothing() -> None:
    p = _views("none", n=10)
    assert (p.crop == torch.tensor([0, 0, 32, 32])).all() and not (p.flip | p.jitter | p.grayscale).any()


def test_randaugment_ops_signs_and_magnitudes_follow_torchvision() -> None:
    spec = AugmentSpec.parse("strength:0.9")
    p = _views("strength:0.9")
    assert p.ra_ops.shape == (N_VIEWS, spec.num_ops)
    freq = np.bincount(p.ra_ops.flatten().numpy(), minlength=len(RA_OPS)) / p.ra_ops.numel()
    assert np.abs(freq - 1 / len(RA_OPS)).max() < 0.006
    space = v2.RandAugment._AUGMENTATION_SPACE
    table = ra_magnitude_table(spec.magnitude, 32, 32)
    for op, (name, signed) in enumerate(RA_OPS):
        values = space[name][0](100, 32, 32)
        assert float(table[op]) == (0.0 if values is None else float(values[spec.magnitude])), name
        mags = p.ra_magnitudes[p.ra_ops == op]
        assert torch.equal(mags.abs(), torch.full_like(mags, float(table[op]))), name
        negative = float((mags < 0).float().mean())
        assert (abs(negative - 0.5) < 0.03) if signed and table[op] > 0 else negative == 0.0, name


def test_view_ids_fresh_per_epoch_fixed_in_range_and_zero_for_none() -> None:
    indices = torch.arange(5000)
    assert (view_ids_for(AugmentSpec.parse("full"), 0, 7, indices) == 7).all()
    assert (view_ids_for(AugmentSpec.parse("none"), 0, 7, indices) == 0).all()
    fixed = AugmentSpec.parse("fullfixed:4")
    ids = view_ids_for(fixed, 0, 7, indices)
    assert np.abs(np.bincount(ids.numpy(), minlength=4) / 5000 - 0.25).max() < 0.03
    assert not torch.equal(ids, view_ids_for(fixed, 0, 8, indices))


def test_parameters_depend_only_on_seed_sample_and_view() -> None:
    spec = AugmentSpec.parse("full")
    a = sample_view_params(spec, 1, torch.tensor([5, 9]), torch.tensor([2, 3]), 32, 3)
    b = sample_view_params(spec, 1, torch.tensor([9, 5, 5]), torch.tensor([3, 2, 4]), 32, 3)
    for field in ("crop", "flip", "jitter", "factors", "order", "grayscale"):
        x, y = getattr(a, field), getattr(b, field)
        assert torch.equal(x[0], y[1]) and torch.equal(x[1], y[0]), field
    c = sample_view_params(spec, 2, torch.tensor([5, 9]), torch.tensor([2, 3]), 32, 3)
    assert not torch.equal(a.factors, c.factors)


def test_random_view_labels_are_stable_uniform_and_distinct_per_view() -> None:
    spec = AugmentSpec.parse("fullfixed:3:random")
    indices = torch.arange(6000)
    targets = torch.zeros(6000, dtype=torch.int64)
    labels = [view_targets(spec, targets, 11, indices, torch.full_like(indices, v), 10) for v in range(3)]
    assert torch.equal(labels[0], view_targets(spec, targets, 11, indices.clone(), torch.zeros_like(indices), 10))
    assert np.abs(np.bincount(labels[0].numpy(), minlength=10) / 6000 - 0.1).max() < 0.02
    assert float((labels[0] == labels[1]).float().mean()) < 0.15  # ≈ 1/10 agree by chance
    assert not torch.equal(labels[0], view_targets(spec, targets, 12, indices, torch.zeros_like(indices), 10))
    same = AugmentSpec.parse("fullfixed:3")
    true = torch.arange(6000) % 7
    assert torch.equal(view_targets(same, true, 11, indices, torch.ones_like(indices), 10), true)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("spec", ["full", "standard", "strength:0.7", "fullfixed:5:random"])
def test_parameters_are_identical_on_cpu_and_cuda(spec: str) -> None:
    cpu, gpu = _views(spec), _views_on("cuda", spec)
    for field in ("crop", "flip", "jitter", "factors", "order", "grayscale", "ra_ops", "ra_magnitudes"):
        assert torch.equal(getattr(cpu, field), getattr(gpu, field).cpu()), field
    indices = torch.arange(N_VIEWS)
    assert torch.equal(epoch_permutation(N_VIEWS, 3, 4), epoch_permutation(N_VIEWS, 3, 4, "cuda").cpu())
    assert torch.equal(counter_bits(9, indices, 2, 5), counter_bits(9, indices.cuda(), 2, 5).cpu())


def _views_on(device: str, spec: str):
    s = AugmentSpec.parse(spec)
    indices = torch.arange(N_VIEWS, device=device)
    return sample_view_params(s, 5, indices, view_ids_for(s, 5, 3, indices), (32, 32), 3)
