"""The training step at the hardware's pace: --compile-mode and --cuda-graph are recorded and refused where they
cannot work (CPU), the optimizer keeps this run's execution flags on resume, and on a GPU (tests marked `gpu`)
the CUDA-graph step trains as the eager step does and fused/capturable Adam steps as plain Adam does."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from conftest import QUICK_RUN, run_module

from fastmem.errors import FastmemError
from fastmem.models import create_model
from fastmem.run.config import EXECUTION_KNOBS, TrainConfig
from fastmem.run.metrics import read_metrics
from fastmem.train.build import adam_flags, build_optimizer, keep_execution_flags
from fastmem.train.cuda_graph import CudaGraphStep, check_cuda_graph
from fastmem.train.loop import compute_loss, train_step

CUDA = torch.device("cuda")
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_config_records_the_compile_mode_and_the_cuda_graph_choice(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_module("fastmem.train", *QUICK_RUN, "--compile-mode", "max-autotune", "--epochs", "0",
                        "--probe-every", "-1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["compile_mode"] == "max-autotune" and config["cuda_graph"] is False


def test_help_names_the_compile_modes_and_what_the_cuda_graph_refuses() -> None:
    result = run_module("fastmem.train", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--compile-mode {default,reduce-overhead,max-autotune,max-autotune-no-cudagraphs}" in text
    assert "--cuda-graph BOOL" in text and "refused on CPU, with fp16" in text


def test_cuda_graph_on_cpu_fails_before_work_with_one_line(tmp_path: Path) -> None:
    result = run_module("fastmem.train", *QUICK_RUN, "--cuda-graph", "true", "--epochs", "1", "--out",
                        str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr == ("fastmem: error: --cuda-graph needs a CUDA device (this run's device is cpu); "
                             "drop it or use --device cuda\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("dtype", "compile_model", "mode", "world", "message"), [
    (torch.float16, False, "default", 1, "--cuda-graph does not support fp16"),
    (torch.bfloat16, True, "reduce-overhead", 1, "--cuda-graph with --compile-mode reduce-overhead"),
    (torch.bfloat16, True, "max-autotune", 1, "--cuda-graph with --compile-mode max-autotune"),
    (None, False, "default", 2, "--cuda-graph is not supported under torchrun (2 ranks)"),
])
def test_cuda_graph_refuses_what_it_cannot_capture(dtype: torch.dtype | None, compile_model: bool, mode: str,
                                                   world: int, message: str) -> None:
    with pytest.raises(FastmemError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_cuda_graph(CUDA, dtype, compile_model, mode, world)


@pytest.mark.parametrize(("dtype", "compile_model", "mode"), [
    (torch.bfloat16, False, "default"), (None, False, "default"), (torch.bfloat16, True, "default"),
    (torch.bfloat16, True, "max-autotune-no-cudagraphs"), (torch.bfloat16, False, "reduce-overhead"),
])
def test_cuda_graph_accepts_what_it_can_capture(dtype: torch.dtype | None, compile_model: bool, mode: str) -> None:
    check_cuda_graph(CUDA, dtype, compile_model, mode, 1)  # the mode matters only under --compile


def test_the_new_knobs_leave_run_identities_as_they_were() -> None:
    assert {"compile_mode", "cuda_graph"} <= EXECUTION_KNOBS  # left out of sweep identities: old runs still match


def test_adam_is_fused_only_on_cuda_and_capturable_only_under_the_graph() -> None:
    assert adam_flags(torch.device("cpu"), cuda_graph=False) == {}
    assert adam_flags(CUDA, cuda_graph=False) == {"fused": True}
    assert adam_flags(CUDA, cuda_graph=True) == {"fused": True, "capturable": True}
    model = torch.nn.Linear(3, 2)
    assert build_optimizer(TrainConfig(), model, torch.device("cpu")).defaults["fused"] is None  # torch's default


def test_a_resumed_optimizer_keeps_this_runs_flags_not_the_checkpoints() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    fused = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)  # as a CUDA run's checkpoint holds it
    model(torch.randn(8, 4)).square().mean().backward()
    fused.step()
    plain = build_optimizer(TrainConfig(lr=1e-2), model, torch.device("cpu"))
    plain.load_state_dict(fused.state_dict())
    assert plain.param_groups[0]["fused"] is True  # load_state_dict takes the saved flags
    keep_execution_flags(plain)
    assert plain.param_groups[0]["fused"] is None and plain.param_groups[0]["capturable"] is False
    assert all(state["step"].device.type == "cpu" for state in plain.state.values())
    plain.step()  # steps as torch's default CPU Adam again


def test_the_graph_step_refuses_a_batch_of_another_shape() -> None:
    model = torch.nn.Linear(4, 3)
    step = CudaGraphStep(model, torch.optim.SGD(model.parameters(), lr=0.1), functools.partial(compute_loss, "mse"),
                         None)
    step._stage(torch.randn(8, 4), torch.zeros(8, dtype=torch.int64))
    with pytest.raises(FastmemError, match=r"a batch of \(5, 4\) images after batches of \(8, 4\)"):
        step._stage(torch.randn(5, 4), torch.zeros(5, dtype=torch.int64))


# GPU: the graph step against the eager step, and the fused optimizers against plain Adam.

def _small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("small_cnn", num_classes=10, in_channels=3, image_size=16, width=0.25, bottleneck_dim=256)
    return model.to(CUDA).to(memory_format=torch.channels_last)


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.rand(64, 3, 16, 16, generator=gen).to(CUDA).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 10, (64,), generator=gen).to(CUDA)) for _ in range(count)]


# Graph replay runs the eager step's kernels; only non-deterministic cuDNN reductions may differ, by rounding.
GRAPH_LOSS_RTOL = 1e-3


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, None], ids=["bf16", "fp32"])
def test_graph_step_gives_the_eager_losses(dtype: torch.dtype | None) -> None:
    batches = _batches(8)  # 3 eager warm-up steps, the capture, then 4 more replays
    eager_model, graph_model = _small_model(0), _small_model(0)
    flags = adam_flags(CUDA, cuda_graph=True)
    eager_opt = torch.optim.Adam(eager_model.parameters(), lr=1e-3, **flags)
    graph_opt = torch.optim.Adam(graph_model.parameters(), lr=1e-3, **flags)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    graph_step = CudaGraphStep(graph_model, graph_opt, functools.partial(compute_loss, "mse"), dtype)
    eager_losses, graph_losses = [], []
    for images, targets in batches:
        eager_losses.append(train_step(eager_model, eager_opt, scaler, images, targets, "mse", CUDA, dtype)[0].detach())
        loss, output = graph_step(images, targets)
        graph_losses.append(loss)
        assert output.shape == (64, 10)
    assert graph_step.captured
    torch.testing.assert_close(torch.stack(graph_losses), torch.stack(eager_losses), rtol=GRAPH_LOSS_RTOL, atol=1e-6)
    for (name, a), b in zip(eager_model.state_dict().items(), graph_model.state_dict().values(), strict=True):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-2, atol=1e-3, msg=name)


@pytest.mark.gpu
@requires_gpu
def test_fused_and_capturable_adam_step_as_plain_adam() -> None:
    params = [torch.randn(256, 64, device=CUDA), torch.randn(64, device=CUDA)]
    copies = {name: [p.clone().requires_grad_() for p in params] for name in ("plain", "fused", "capturable")}
    optimizers = {
        "plain": torch.optim.Adam(copies["plain"], lr=3e-4),
        "fused": torch.optim.Adam(copies["fused"], lr=3e-4, **adam_flags(CUDA, cuda_graph=False)),
        "capturable": torch.optim.Adam(copies["capturable"], lr=3e-4, **adam_flags(CUDA, cuda_graph=True)),
    }
    gen = torch.Generator(device=CUDA).manual_seed(0)
    for _ in range(20):
        grads = [torch.randn(p.shape, device=CUDA, generator=gen) for p in params]
        for name, optimizer in optimizers.items():
            for p, g in zip(copies[name], grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    for name in ("fused", "capturable"):
        for p, q in zip(copies[name], copies["plain"], strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@requires_gpu
def test_training_with_the_cuda_graph_matches_the_eager_run(tmp_path: Path) -> None:
    gpu_run = [a if a != "cpu" else "cuda" for a in QUICK_RUN]
    common = [*gpu_run, "--augment", "full", "--mixup", "0.5", "--epochs", "3", "--probe-every", "-1"]
    eager = run_module("fastmem.train", *common, "--out", str(tmp_path / "eager"))
    graph = run_module("fastmem.train", *common, "--cuda-graph", "true", "--out", str(tmp_path / "graph"))
    assert eager.returncode == 0 and graph.returncode == 0, eager.stderr + graph.stderr
    losses = {name: [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")] for name in ("eager", "graph")}
    assert len(losses["graph"]) == 3
    torch.testing.assert_close(losses["graph"], losses["eager"], rtol=1e-2, atol=0)
    resumed = run_module("fastmem.train", "--resume", str(tmp_path / "graph"), "--epochs", "4", "--progress", "false")
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_divergence_on_cuda_still_names_the_first_bad_step(tmp_path: Path, graph: bool) -> None:
    gpu_run = [a if a != "cpu" else "cuda" for a in QUICK_RUN]
    out = tmp_path / "run"
    result = run_module("fastmem.train", *gpu_run, "--precision", "fp32", "--epochs", "2", "--lr", "1e30",
                        "--checkpoint-every", "1", "--probe-every", "-1", "--cuda-graph", str(graph).lower(),
                        "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip() == ("fastmem: error: non-finite loss at epoch 1, step 2; stopping "
                                     "(the last good checkpoint is kept)")
    assert not (out / "checkpoint.pt").exists()
