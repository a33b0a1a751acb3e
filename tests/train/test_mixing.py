"""Experiment I: Mixup and CutMix per batch, labels kept, deterministic per (seed, epoch, step)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import QUICK_RUN, run_module

from fastmem.errors import FastmemError
from fastmem.run.checkpoint import load_checkpoint
from fastmem.run.metrics import read_metrics
from fastmem.train.mixing import apply_batch_mix, check_mixing_knobs, draw_batch_mix, mix_batch


def _batch(b: int = 16, size: int = 12) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_mixup_blends_each_image_with_its_partner_by_lambda() -> None:
    x = _batch()
    mix = draw_batch_mix(16, (12, 12), mixup=1.0, cutmix=0.0, seed=1, epoch=2, step=3)
    assert mix.kind == "mixup" and 0.0 <= mix.lam < 1.0
    assert sorted(mix.perm.tolist()) == list(range(16))
    mixed = mix_batch(x, mixup=1.0, cutmix=0.0, seed=1, epoch=2, step=3)
    assert torch.allclose(mixed, mix.lam * x + (1 - mix.lam) * x[mix.perm], atol=1e-6)
    assert torch.equal(x, _batch())  # the input is left alone


def test_lambda_is_uniform_and_the_probability_is_per_batch() -> None:
    draws = [draw_batch_mix(8, (4, 4), mixup=0.8, cutmix=0.0, seed=0, epoch=1, step=s) for s in range(2000)]
    mixed = [d for d in draws if d.kind == "mixup"]
    assert 0.77 < len(mixed) / len(draws) < 0.83 and all(d.kind in ("mixup", "none") for d in draws)
    lams = torch.tensor([d.lam for d in mixed])
    assert 0.47 < float(lams.mean()) < 0.53 and float(lams.min()) < 0.02 and float(lams.max()) > 0.98


def test_cutmix_pastes_one_box_of_area_one_minus_lambda_from_the_partner() -> None:
    x = _batch(size=32)
    for step in range(20):
        mix = draw_batch_mix(16, (32, 32), mixup=0.0, cutmix=1.0, seed=3, epoch=1, step=step)
        top, left, h, w = mix.box
        assert mix.kind == "cutmix" and 0 <= top <= 32 - h and 0 <= left <= 32 - w
        assert abs(h * w / 32**2 - (1 - mix.lam)) <= 2 * 32 / 32**2 + 1e-9  # up to rounding each side
        mixed = apply_batch_mix(x, mix)
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[top:top + h, left:left + w] = True
        assert torch.equal(mixed[..., inside], x[mix.perm][..., inside])
        assert torch.equal(mixed[..., ~inside], x[..., ~inside])


def test_mixing_is_a_function_of_seed_epoch_and_step_only() -> None:
    x = _batch()
    kwargs = dict(mixup=0.5, cutmix=0.5, seed=9, epoch=4, step=7)
    torch.manual_seed(123)
    a = mix_batch(x, **kwargs)
    torch.manual_seed(456)  # the global RNG has no say
    assert torch.equal(a, mix_batch(x, **kwargs))
    assert not torch.equal(a, mix_batch(x, **{**kwargs, "step": 8}))
    assert mix_batch(x, mixup=0.0, cutmix=0.0, seed=0, epoch=1, step=1) is x


@pytest.mark.parametrize("mixup,cutmix,message", [(1.5, 0.0, "--mixup is a per-batch probability"),
                                                  (0.0, -0.1, "--cutmix is a per-batch probability"),
                                                  (0.7, 0.5, "exceeds 1")])
def test_bad_probabilities_are_one_clear_error(mixup: float, cutmix: float, message: str) -> None:
    with pytest.raises(FastmemError, match=message):
        check_mixing_knobs(mixup, cutmix)


def test_resume_of_a_mixup_run_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    common = (*QUICK_RUN, "--augment", "none", "--checkpoint-every", "1", "--probe-every", "-1",
              "--mixup", "0.5", "--cutmix", "0.5")
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_module("fastmem.train", *common, "--epochs", "2", "--out", str(whole)).returncode == 0
    assert run_module("fastmem.train", *common, "--epochs", "1", "--out", str(part)).returncode == 0
    resumed = run_module("fastmem.train", "--resume", str(part), "--epochs", "2", "--progress", "false")
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_checkpoint(whole / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    losses = lambda d: [r["loss"] for r in read_metrics(d / "metrics.jsonl")]  # noqa: E731
    assert losses(whole) == losses(part)
