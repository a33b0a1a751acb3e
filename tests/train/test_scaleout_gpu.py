"""TensorRT extraction and DDP on GPUs (marked `gpu`, skipped without CUDA), and the CPU fallback of `--extract-backend trt`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUICK_RUN, REPO, run_module

from fastmem.run.metrics import read_metrics

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_trt = pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is None, reason="needs torch-tensorrt")
GPU_RUN = [a if a != "cpu" else "cuda" for a in QUICK_RUN]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without a GPU")
def test_trt_extraction_without_a_gpu_falls_back_to_eager_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from fastmem.data.synthetic import make_synthetic
    from fastmem.models import create_model
    from fastmem.probe import probe_knn, trt_extract

    trt_extract._fallback_reported.clear()
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=3, image_size=16, width=0.25, bottleneck_dim=32)
    train, test = make_synthetic(96, size=16, seed=1), make_synthetic(40, size=16, seed=2)
    common = dict(device=torch.device("cpu"), k=5, num_classes=10)
    eager = probe_knn(model, train.images, train.labels, test.images, test.labels, **common)
    capsys.readouterr()
    for _ in range(2):
        trt = probe_knn(model, train.images, train.labels, test.images, test.labels, extract_backend="trt", **common)
        assert trt == eager
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == ["fastmem: --extract-backend trt unavailable (it needs a CUDA device); extracting embeddings eagerly"]


@pytest.mark.gpu
@needs_cuda
@needs_trt
def test_trt_probe_matches_the_eager_probe_within_a_tenth_of_a_point(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*GPU_RUN, "--subset", "2048", "--probe-subset", "2000", "--epochs", "2", "--augment", "none",
            "--probe-every", "-1", "--out", str(out)]
    assert (trained := run_module("fastmem.train", *args)).returncode == 0, trained.stderr
    results = {}
    for backend in ("eager", "trt", "trt"):  # the second trt probe loads the cached engine
        probed = run_module("fastmem.probe", str(out), "--device", "cuda", "--no-cache", "--extract-backend", backend,
                            "--extract-batch-size", "512", "--precision", "fp16")  # fp16 eager autocast vs fp16 engine
        assert probed.returncode == 0, probed.stderr
        assert "unavailable" not in probed.stdout and "rebuilding" not in probed.stdout
        results.setdefault(backend, []).append(json.loads((out / "probe-epoch2-k20-majority.json").read_text())["accuracy"])
    engines = list((out / "trt-engines").glob("*.ep"))
    assert len(engines) == 1, engines
    eager = results["eager"][0]
    for trt in results["trt"]:
        for layer, value in eager.items():
            assert abs(trt[layer] - value) <= 0.001 + 1e-9, (layer, trt[layer], value)


@pytest.mark.gpu
@needs_cuda
def test_torchrun_with_one_gpu_trains_and_probes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "FASTMEM_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m",
               "fastmem.train", *GPU_RUN, "--epochs", "2", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1, 2]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL allows one rank per GPU)")
def test_two_nccl_ranks_with_sync_batchnorm_train(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "FASTMEM_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "fastmem.train", *GPU_RUN, "--sync-bn", "true", "--epochs", "2", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    records = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2] and "2 ranks × batch 32" in result.stdout
