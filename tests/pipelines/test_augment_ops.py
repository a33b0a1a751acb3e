"""Augment kinds are lists of ops (params.AUGMENT_OPS); executors and backends run a kind only where they
implement every op of it: a new op is never skipped silently, by an executor or by a backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastmem.pipelines import AUGMENT_OPS, BACKENDS, AugmentSpec, check_pipeline, make_loader
from fastmem.pipelines.executors import fused_cpu, fused_cuda, reference, select
from fastmem.pipelines.params import AUGMENT_KINDS, sample_view_params

from fastmem.errors import FastmemError

DUMMY = "dummy_op"


def _images(n: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, 12, 12, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _params(spec: str, n: int = 8):
    return sample_view_params(AugmentSpec.parse(spec), 3, torch.arange(n), torch.full((n,), 2), 12, 3)


@pytest.fixture
def dummy_in_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """`full` gains an op that no executor or backend implements (until a test says otherwise)."""
    monkeypatch.setitem(AUGMENT_OPS, "full", (*AUGMENT_OPS["full"], DUMMY))


def test_every_kind_has_its_ops_and_the_reference_implements_all_of_them() -> None:
    assert set(AUGMENT_KINDS) == {"none", "standard", "full", "strength"}
    assert AugmentSpec.parse("fullfixed:3").ops == AUGMENT_OPS["full"] == _params("full").ops
    assert AugmentSpec.parse("strength:0.5").ops == ("randaugment",) and AugmentSpec.parse("none").ops == ()
    assert set().union(*AUGMENT_OPS.values()) <= reference.OPS
    assert fused_cpu.OPS == fused_cuda.OPS == reference.OPS - {"randaugment"}


def test_the_fastest_executor_is_fused_where_it_implements_every_op() -> None:
    images = _images()
    assert select.pick_executor(_params("full"), images) is fused_cpu
    assert select.pick_executor(_params("strength:0.5"), images) is reference
    assert select.pick_executor(_params("full"), images, "reference") is reference


def test_a_new_op_sends_the_batch_to_an_executor_that_implements_it(
        dummy_in_full: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reference, "OPS", reference.OPS | {DUMMY})
    images, params = _images(), _params("full")
    assert DUMMY in params.ops
    assert not fused_cpu.supports(params, images) and not fused_cuda.supports(params, images)
    with pytest.raises(ValueError, match=f"does not implement {DUMMY}"):
        fused_cpu.apply_views(images, params)
    assert select.pick_executor(params, images) is reference
    got = select.apply_views_fastest(images, params)  # the reference executor ran (it now "implements" the op)
    assert torch.equal(got, reference.apply_views(images, params))
    check_pipeline("device", "full")  # the backends on the shared executors take it too


def test_an_op_no_executor_implements_is_a_clear_error(dummy_in_full: None) -> None:
    images, params = _images(), _params("full")
    with pytest.raises(FastmemError, match=f"no executor implements {DUMMY} of full views") as err:
        select.apply_views_fastest(images, params)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=f"reference executor does not implement {DUMMY}"):
        reference.apply_views(images, params)
    with pytest.raises(FastmemError, match=f"the device pipeline does not execute full .{DUMMY}.; no pipeline executes it"):
        check_pipeline("device", "full")
    with pytest.raises(FastmemError, match="does not execute full"):  # make_loader asks first: nothing is built
        make_loader("device", np.zeros((16, 8, 8, 3), np.uint8), np.zeros(16, np.int64), augment="full", batch_size=8)


def test_dali_refuses_an_op_its_graph_does_not_execute(dummy_in_full: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reference, "OPS", reference.OPS | {DUMMY})
    assert "full" not in BACKENDS["dali"].kinds and "full" in BACKENDS["device"].kinds
    with pytest.raises(FastmemError, match=f"the dali pipeline does not execute fullfixed:2:same .{DUMMY}.; "
                                           "use --pipeline device, torch or ffcv"):
        check_pipeline("dali", "fullfixed:2")
    check_pipeline("dali", "standard")


def test_capabilities_come_from_the_registry() -> None:
    assert BACKENDS["dali"].kinds == ("none", "standard", "full")
    assert all(BACKENDS[name].kinds == AUGMENT_KINDS for name in ("device", "torch", "ffcv"))
    with pytest.raises(FastmemError, match=r"^the dali pipeline does not execute strength:0.5 \(randaugment\); "
                                           r"use --pipeline device, torch or ffcv$"):
        check_pipeline("dali", "strength:0.5")
    with pytest.raises(FastmemError, match="--iid-views is supported by the device and torch pipelines, not 'ffcv'"):
        check_pipeline("ffcv", "none", view_pool=True)
    with pytest.raises(FastmemError, match="unknown pipeline 'nope'; available: device, torch, dali, ffcv"):
        check_pipeline("nope")
