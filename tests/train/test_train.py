"""The trainer end to end on CPU: loss falls, resume reproduces, bad input fails cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUICK_RUN, assert_same_weights, run_module

from fastmem.run.checkpoint import load_checkpoint
from fastmem.run.metrics import read_metrics


def _train(*args: str):
    return run_module("fastmem.train", *QUICK_RUN, *args)


def test_memorizing_random_labels_without_augmentation_lowers_the_loss(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _train("--augment", "none", "--epochs", "6", "--lr", "1e-3", "--probe-every", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    records = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == list(range(7))
    trained = records[1:]
    assert trained[-1]["loss"] < 0.9 * trained[0]["loss"]
    assert trained[-1]["train_acc_random"] > trained[0]["train_acc_random"]
    assert {"knn/stem", "knn/h", "knn/head_hidden", "knn/z"} <= set(records[0]) and "knn/z" in records[3]
    assert all(0 <= r["train_acc_true"] <= 1 and r["images_per_s"] > 0 for r in trained)
    config = json.loads((out / "config.json").read_text())
    assert config["augment"] == "none" and config["label_noise"] == 1.0 and config["out"] == str(out)
    assert (out / "labels.npz").exists() and (out / "summary.json").exists()
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 6


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    common = ("--augment", "full", "--checkpoint-every", "1", "--probe-every", "-1")
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert _train(*common, "--epochs", "4", "--out", str(whole)).returncode == 0
    assert _train(*common, "--epochs", "2", "--out", str(part)).returncode == 0
    resumed = run_module("fastmem.train", "--resume", str(part), "--epochs", "4", "--progress", "false")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(whole, part, 4)
    losses = lambda d: [r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert losses(whole) == losses(part)


def test_a_run_directory_is_never_overwritten_silently(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train("--epochs", "1", "--probe-every", "-1", "--out", str(out)).returncode == 0
    before = (out / "checkpoint.pt").read_bytes()
    again = _train("--epochs", "1", "--probe-every", "-1", "--out", str(out))
    assert again.returncode == 2
    assert again.stderr.strip() == f"fastmem: error: {out} already holds a run; continue it with --resume {out} or choose another --out"
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resume_refuses_flags_that_change_the_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train("--epochs", "1", "--probe-every", "-1", "--out", str(out)).returncode == 0
    result = run_module("fastmem.train", "--resume", str(out), "--label-noise", "0.5", "--epochs", "2")
    assert result.returncode == 2
    assert "was run with other values of --label-noise" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_divergence_stops_naming_epoch_and_step_and_writes_no_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # An Adam step of 1e30 blows the weights up: step 1 is finite, step 2 is not.
    result = _train("--epochs", "2", "--lr", "1e30", "--checkpoint-every", "1", "--probe-every", "-1", "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip() == ("fastmem: error: non-finite loss at epoch 1, step 2; stopping "
                                     "(the last good checkpoint is kept)")
    assert not (out / "checkpoint.pt").exists()


def test_non_finite_loss_after_a_checkpoint_keeps_that_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train("--epochs", "1", "--probe-every", "-1", "--out", str(out)).returncode == 0
    # Weights that overflow fp32 in the output layer (as an fp16/bf16 overflow or divergence would).
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    checkpoint["model"]["projector.out.weight"] *= 1e30
    torch.save(checkpoint, out / "checkpoint.pt")
    saved = (out / "checkpoint.pt").read_bytes()
    result = run_module("fastmem.train", "--resume", str(out), "--epochs", "3", "--progress", "false")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("fastmem: error: non-finite loss at epoch 2, step 1;")
    assert (out / "checkpoint.pt").read_bytes() == saved


@pytest.mark.parametrize(
    "args,message",
    [
        (["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a CUDA device"),
        (["--dataset", "imagenet-9000"], "unknown dataset 'imagenet-9000'"),
        (["--model", "vgg"], "unknown model 'vgg'"),
        (["--label-noise", "1.5"], "--label-noise must be in [0, 1]"),
        (["--subset", "50"], "fewer than one batch of 64"),
        (["--epochs", "-1"], "--epochs must be >= 0"),
        (["--resume", "/nonexistent/run"], "/nonexistent/run: not a run directory"),
    ],
)
def test_bad_flags_fail_before_work_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = _train("--epochs", "1", "--out", str(tmp_path / "run"), *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("fastmem: error: ")
    assert message in result.stderr
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_requested_without_a_gpu_is_a_user_error(tmp_path: Path) -> None:
    result = _train("--device", "cuda", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "--device cuda requested but no CUDA GPU is available" in result.stderr


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train("--epochs", "1", "--probe-every", "-1", "--out", str(out)).returncode == 0
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    result = run_module("fastmem.train", "--resume", str(out), "--epochs", "2")
    assert result.returncode == 2
    assert f"{out / 'checkpoint.pt'}: not a loadable fastmem checkpoint" in result.stderr


def test_checkpoints_refuse_pickled_code(tmp_path: Path) -> None:
    import os

    from fastmem.errors import FastmemError

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"model": Exploit(), "epoch": 1}, tmp_path / "evil.pt")
    with pytest.raises(FastmemError, match="not a loadable fastmem checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_help_documents_every_knob_with_its_default() -> None:
    result = run_module("fastmem.train", "--help")
    assert result.returncode == 0
    for flag in ("--dataset", "--data-dir", "--pipeline", "--augment", "--label-noise", "--label-seed", "--model",
                 "--bottleneck-dim", "--epochs", "--batch-size", "--out", "--resume", "--precision", "--compile"):
        assert flag in result.stdout
    assert "(default: 1.0)" in result.stdout and "(default: 256)" in result.stdout


@pytest.mark.parametrize("pipeline", ["device", "torch", "dali", "ffcv"])
def test_every_backend_trains_the_small_cnn_for_an_epoch_on_fashion_mnist(tmp_path: Path, pipeline: str) -> None:
    out = tmp_path / pipeline
    result = run_module("fastmem.train", "--dataset", "fashion-mnist", "--subset", "512", "--probe-subset", "200",
                        "--pipeline", pipeline, "--augment", "full", "--width", "0.25", "--bottleneck-dim", "256",
                        "--batch-size", "128", "--epochs", "1", "--probe-every", "-1", "--device", "cpu",
                        "--threads", "1", "--progress", "false", "--out", str(out))
    assert result.returncode == 0, result.stderr
    (record,) = read_metrics(out / "metrics.jsonl")
    assert record["epoch"] == 1 and np.isfinite(record["loss"]) and record["images_per_s"] > 0
    assert json.loads((out / "config.json").read_text())["pipeline"] == pipeline


def test_the_probe_temperature_reaches_the_weighted_vote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import OrderedDict

    import fastmem.train.loop as trainer
    from fastmem.probe import ProbeResult
    from fastmem.run.config import parse_args

    calls: list[dict] = []
    answer = ProbeResult(OrderedDict(z=np.array([1, 0])), np.array([1, 1]))
    monkeypatch.setattr(trainer, "probe_predictions", lambda *a, **k: calls.append(k) or answer)
    cfg, explicit, resume = parse_args([*QUICK_RUN, "--epochs", "0", "--probe-vote", "weighted",
                                        "--probe-temperature", "0.25", "--out", str(tmp_path / "run")])
    trainer.train(cfg, explicit, resume)
    assert [(c["vote"], c["temperature"]) for c in calls] == [("weighted", 0.25)]
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == [{"epoch": 0, "knn/z": 0.5, "probe_queries": 2}]


def test_train_step_is_one_optimisation_step() -> None:
    from fastmem.train import train_step

    torch.manual_seed(0)
    model, replica = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    replica.load_state_dict(model.state_dict())
    optimizer, replica_optimizer = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, replica))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images, targets = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loss, output = train_step(model, optimizer, scaler, images, targets, "mse", torch.device("cpu"), None)
    expected = torch.nn.functional.mse_loss(replica(images), torch.nn.functional.one_hot(targets, 3).float())
    expected.backward()
    replica_optimizer.step()
    assert output.shape == (8, 3) and loss.equal(expected.detach())
    assert model.weight.equal(replica.weight) and model.bias.equal(replica.bias)
