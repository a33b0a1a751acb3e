"""Experiment J: load trained weights, re-initialize exactly the named parts, train on random labels, probe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import QUICK_RUN, run_module

from fastmem.errors import FastmemError
from fastmem.models import EncoderProjector, create_model
from fastmem.run.checkpoint import save_checkpoint
from fastmem.run.metrics import read_metrics
from fastmem.train.reinit import check_init_knobs, init_from_checkpoint, part_prefixes


def _model(seed: int, name: str = "small_cnn", width: float = 0.25) -> EncoderProjector:
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, in_channels=1, image_size=16, width=width, bottleneck_dim=64)


def _trained_checkpoint(path: Path, name: str = "small_cnn") -> dict[str, torch.Tensor]:
    """A 'trained' state: the seed-0 init moved away from any fresh init, BN statistics included."""
    state = {key: (value + 1 if value.is_floating_point() else value + 7) for key, value in _model(0, name).state_dict().items()}
    save_checkpoint(path, {"model": state, "epoch": 5})
    return state


@pytest.mark.parametrize("name,reinit", [("small_cnn", "stage4,head_out"), ("small_cnn", "head"),
                                         ("resnet18", "stem,stage3"), ("mlp", "stage2,head_hidden")])
def test_exactly_the_named_parts_are_fresh_and_the_rest_is_bit_identical(tmp_path: Path, name: str, reinit: str) -> None:
    trained = _trained_checkpoint(tmp_path / "checkpoint.pt", name)
    model = _model(1, name)
    fresh = {key: value.clone() for key, value in model.state_dict().items()}
    assert init_from_checkpoint(model, str(tmp_path), reinit) == tuple(reinit.split(","))
    prefixes = tuple(part_prefixes(model)[part] for part in reinit.split(","))
    reset = [key for key in fresh if key.startswith(prefixes)]
    assert reset and len(reset) < len(fresh)
    for key, value in model.state_dict().items():
        expected = fresh[key] if key.startswith(prefixes) else trained[key]
        assert torch.equal(value, expected), key
        if key.startswith(prefixes):
            assert not torch.equal(value, trained[key]), key


def test_head_names_cover_the_projector_layers() -> None:
    parts = part_prefixes(_model(0))
    assert list(parts) == ["stem", "stage1", "stage2", "stage3", "stage4", "head", "head_hidden", "head_out"]
    assert parts["head"] == "projector." and parts["head_out"] == "projector.out."


@pytest.mark.parametrize("reinit,message", [
    ("stage4,stage9", "--reinit: unknown part(s) stage9; this model has stem, stage1, stage2, stage3, stage4, head, "
                      "head_hidden, head_out"),
    ("projector", "unknown part(s) projector"),
])
def test_unknown_part_names_are_one_clear_error(tmp_path: Path, reinit: str, message: str) -> None:
    _trained_checkpoint(tmp_path / "checkpoint.pt")
    with pytest.raises(FastmemError) as error:
        init_from_checkpoint(_model(1), str(tmp_path / "checkpoint.pt"), reinit)
    assert str(error.value) == message or message in str(error.value)
    with pytest.raises(FastmemError, match="unknown part"):  # also before any work, on the meta device
        check_init_knobs(str(tmp_path), reinit, "small_cnn", 0.25, 64)


def test_bad_init_sources_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FastmemError, match="--reinit needs --init-from"):
        check_init_knobs("", "head", "small_cnn", 1.0, 64)
    with pytest.raises(FastmemError, match="no checkpoint there"):
        check_init_knobs(str(tmp_path / "missing"), "", "small_cnn", 1.0, 64)
    _trained_checkpoint(tmp_path / "checkpoint.pt")
    wider = _model(1, width=0.5)
    with pytest.raises(FastmemError, match="its weights do not fit this model"):
        init_from_checkpoint(wider, str(tmp_path), "head")


def test_a_run_from_a_trained_model_with_reinit_trains_and_probes(tmp_path: Path) -> None:
    base, child = tmp_path / "base", tmp_path / "child"
    common = (*QUICK_RUN, "--augment", "none", "--probe-every", "0")
    assert run_module("fastmem.train", *common, "--epochs", "1", "--out", str(base)).returncode == 0
    result = run_module("fastmem.train", *common, "--epochs", "1", "--init-from", str(base),
                        "--reinit", "stage4,head", "--out", str(child))
    assert result.returncode == 0, result.stderr
    start, end = read_metrics(child / "metrics.jsonl")
    assert start["epoch"] == 0 and end["epoch"] == 1 and "knn/z" in end and "loss" in end
    base_end = read_metrics(base / "metrics.jsonl")[-1]
    for layer in ("stem", "stage1", "stage2", "stage3"):  # kept weights: the child starts where the base ended
        assert start[f"knn/{layer}"] == base_end[f"knn/{layer}"], layer
    bad = run_module("fastmem.train", *common, "--epochs", "1", "--init-from", str(base), "--reinit", "stage7",
                     "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown part(s) stage7" in bad.stderr
    assert not (tmp_path / "bad").exists()
