"""GPU paths of the trainer and probe (marked `gpu`; skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUICK_RUN, run_module
from fastmem.kernels import knn_classify

from fastmem.run.metrics import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU_RUN = [a if a != "cpu" else "cuda" for a in QUICK_RUN]


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_training_on_cuda_memorizes_with_every_precision(tmp_path: Path, precision: str) -> None:
    out = tmp_path / precision
    result = run_module("fastmem.train", *GPU_RUN, "--augment", "none", "--epochs", "8", "--lr", "1e-3",
                        "--precision", precision, "--probe-every", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    records = read_metrics(out / "metrics.jsonl")
    assert f"precision {dict(bf16='torch.bfloat16', fp16='torch.float16', fp32='fp32')[precision]}" in result.stdout
    assert records[-1]["loss"] < 0.9 * records[1]["loss"]
    assert all(np.isfinite(r["loss"]) for r in records[1:])


def test_compiled_resnet18_trains_on_cuda(tmp_path: Path) -> None:
    result = run_module("fastmem.train", *GPU_RUN, "--model", "resnet18", "--image-size", "32", "--compile", "true",
                        "--epochs", "2", "--probe-every", "-1", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr


def test_resume_on_cuda_continues_the_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_module("fastmem.train", *GPU_RUN, "--epochs", "2", "--probe-every", "-1", "--out", str(out)).returncode == 0
    result = run_module("fastmem.train", "--resume", str(out), "--epochs", "3", "--progress", "false")
    assert result.returncode == 0, result.stderr
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_knn_on_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(0)
    reference, queries = torch.randn(20000, 128, generator=gen), torch.randn(2000, 128, generator=gen)
    labels = torch.randint(0, 10, (20000,), generator=gen)
    on_cpu = knn_classify(reference, labels, queries, k=20)
    on_gpu = knn_classify(reference.cuda(), labels.cuda(), queries.cuda(), k=20).cpu()
    assert (on_cpu == on_gpu).float().mean() > 0.999  # TF32/fp32 rounding may flip exact near-ties
