"""DDP on CPU with gloo: 2 ranks train on disjoint shards with identical weights, probe exactly as one process, resume.

Ranks run as spawned processes (torch.multiprocessing, the torchrun environment variables set by hand)
where a test needs to look inside them, and under `python -m torch.distributed.run` (torchrun) where
it checks the command a user types.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import QUICK_RUN, REPO, assert_same_weights, run_module

from fastmem.errors import FastmemError
from fastmem.run.metrics import read_metrics

WORLD = 2
RUN = ["--epochs", "2", "--augment", "full", "--probe-every", "0", "--checkpoint-every", "1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _join_group(rank: int, port: int) -> None:
    """What torchrun does for a worker: the rendezvous variables (the trainer's session reads them)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), FASTMEM_OFFLINE="1")
    torch.set_num_threads(1)


class _RecordingLoader:
    """Wraps a loader and records the sample indices of every batch, per epoch."""

    def __init__(self, loader: Any, seen: dict[int, list[int]]) -> None:
        self.loader, self.seen = loader, seen

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.seen.setdefault(self.loader.epoch, []).extend(batch.indices.tolist())
            yield batch


def _train_rank(rank: int, port: int, argv_per_rank: list[list[str]], report_dir: str) -> None:
    _join_group(rank, port)
    import fastmem.train.build as builder
    import fastmem.train.loop as trainer
    from fastmem.distributed import distributed_session
    from fastmem.run.config import parse_args

    seen: dict[int, list[int]] = {}
    models: list[torch.nn.Module] = []
    make_loader, create_model = builder.make_loader, builder.create_model
    builder.make_loader = lambda *a, **k: _RecordingLoader(make_loader(*a, **k), seen)
    builder.create_model = lambda *a, **k: models.append(create_model(*a, **k)) or models[-1]
    cfg, explicit, resume = parse_args(argv_per_rank[rank])
    with distributed_session() as info:
        assert (info.rank, info.world) == (rank, WORLD)
        trainer.train(cfg, explicit, resume)
    digest = hashlib.sha256()
    for _, parameter in models[0].named_parameters():
        digest.update(parameter.detach().contiguous().numpy().tobytes())
    report = {"seen": seen, "parameters": digest.hexdigest()}
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(report))


def _spawn(worker, *args: Any) -> None:
    mp.spawn(worker, args=(_free_port(), *args), nprocs=WORLD, join=True)


def _torchrun(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FASTMEM_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               "-m", module, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory,
                 precision_flags: list[str]) -> tuple[Path, list[dict[str, Any]], list[str]]:
    """A 2-rank run of RUN (spawned ranks) in each of conftest's precisions; rank 1 is told another --out, which
    must stay empty."""
    root = tmp_path_factory.mktemp("ddp")
    argv = [[*QUICK_RUN, *RUN, *precision_flags, "--out", str(root / f"rank{r}-out")] for r in range(WORLD)]
    _spawn(_train_rank, argv, str(root))
    return root, [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)], precision_flags


def test_two_gloo_ranks_train_disjoint_shards_with_identical_weights_and_only_rank0_writes(
    tmp_path: Path, two_rank_run: tuple[Path, list[dict[str, Any]], list[str]]
) -> None:
    root, reports, flags = two_rank_run
    assert reports[0]["parameters"] == reports[1]["parameters"]
    for epoch in ("1", "2"):  # 256 images, global batch 64 = 2 ranks x 32: every image once, on one rank
        shards = [set(report["seen"][epoch]) for report in reports]
        assert len(reports[0]["seen"][epoch]) == len(shards[0]) == 128
        assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(256))
    assert reports[0]["seen"]["1"] != reports[0]["seen"]["2"]  # a new order each epoch
    assert not (root / "rank1-out").exists()
    assert sorted(p.name for p in (root / "rank0-out").iterdir()) == [
        ".lock", "checkpoint.pt", "config.json", "labels.npz", "metrics.jsonl", "probe_predictions", "summary.json"]  # .lock: rank 0 holds the run
    assert json.loads((root / "rank0-out" / "summary.json").read_text())["world_size"] == WORLD

    single = tmp_path / "single"
    result = run_module("fastmem.train", *QUICK_RUN, *RUN, *flags, "--out", str(single))
    assert result.returncode == 0, result.stderr
    ddp, one = read_metrics(root / "rank0-out" / "metrics.jsonl"), read_metrics(single / "metrics.jsonl")
    assert [r["epoch"] for r in ddp] == [r["epoch"] for r in one] == [0, 1, 2]
    # The untrained network: the sharded probe gives the single-process figures exactly.
    assert ddp[0] == one[0]
    # Same global batches and views; each rank's BatchNorm sees its half (plain BN), so close, not equal.
    for a, b in zip(ddp[1:], one[1:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.02)


def _probe_rank(rank: int, port: int, report_dir: str) -> None:
    _join_group(rank, port)
    import torch.distributed as dist

    from fastmem.probe import probe_knn
    from fastmem.probe.sharded import extract_embeddings_sharded

    dist.init_process_group("gloo")  # a group the caller owns: the probe uses it as is
    model, reference, queries = _probe_inputs()
    common = dict(device=torch.device("cpu"), k=5, num_classes=10, extract_batch_size=32)
    accuracy = probe_knn(model, reference.images, reference.labels, queries.images, queries.labels,
                         distributed=True, **common)
    embedded = extract_embeddings_sharded(model, reference.images, layers=model.probe_points, batch_size=32,
                                          device=torch.device("cpu"))
    np.savez(Path(report_dir, f"rank{rank}.npz"), **{name: e.vectors for name, e in embedded.items()},
             **{f"{name}.norms": e.norms for name, e in embedded.items()})
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(accuracy))
    dist.destroy_process_group()


def _probe_inputs():
    from fastmem.data.synthetic import make_synthetic
    from fastmem.models import create_model

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=3, image_size=16, width=0.25, bottleneck_dim=64)
    # Uneven sizes: 7 and 5 extraction batches, queries not divisible by the ranks.
    return model, make_synthetic(200, size=16, seed=1), make_synthetic(131, size=16, seed=2)


def test_sharded_probe_equals_the_single_process_probe_exactly(tmp_path: Path, one_torch_thread: None) -> None:
    from fastmem.probe import extract_embeddings, probe_knn

    _spawn(_probe_rank, str(tmp_path))
    model, reference, queries = _probe_inputs()
    expected = probe_knn(model, reference.images, reference.labels, queries.images, queries.labels,
                         device=torch.device("cpu"), k=5, num_classes=10, extract_batch_size=32)
    embedded = extract_embeddings(model, reference.images, device=torch.device("cpu"), batch_size=32)
    for rank in range(WORLD):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == dict(expected)
        gathered = np.load(tmp_path / f"rank{rank}.npz")
        for name, embedding in embedded.items():
            assert np.array_equal(gathered[name], embedding.vectors), name
            assert np.array_equal(gathered[f"{name}.norms"], embedding.norms), name


def test_resume_of_a_two_rank_torchrun_run_reaches_the_uninterrupted_result(
    tmp_path: Path, two_rank_run: tuple[Path, list[dict[str, Any]], list[str]]
) -> None:
    whole, part = two_rank_run[0] / "rank0-out", tmp_path / "part"
    first = _torchrun("fastmem.train", *QUICK_RUN, *RUN, *two_rank_run[2], "--epochs", "1", "--out", str(part))
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("epoch 1/1") == 1  # rank 0 alone prints
    resumed = _torchrun("fastmem.train", "--resume", str(part), "--epochs", "2", "--progress", "false")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(whole, part, 2)
    final = [read_metrics(d / "metrics.jsonl")[-1] for d in (whole, part)]
    assert final[0] == {**final[1], "images_per_s": final[0]["images_per_s"], "seconds": final[0]["seconds"]}
    # The checkpoint holds no trace of the world size: one process can continue it.
    single = run_module("fastmem.train", "--resume", str(part), "--epochs", "3", "--progress", "false")
    assert single.returncode == 0, single.stderr
    assert [r["epoch"] for r in read_metrics(part / "metrics.jsonl")] == [0, 1, 2, 3]


def test_global_batch_must_split_evenly_across_ranks() -> None:
    from fastmem.distributed import per_rank_batch

    assert per_rank_batch(256, 4) == 64
    with pytest.raises(FastmemError, match="--batch-size 100 is the global batch and must be divisible by the 3 ranks"):
        per_rank_batch(100, 3)


def test_rank_blocks_cover_every_item_once_on_batch_boundaries() -> None:
    from fastmem.probe.sharded import rank_block

    for count, world, align in [(200, 2, 32), (131, 2, 1), (5, 4, 2), (0, 3, 8), (1024, 3, 1024)]:
        blocks = [rank_block(count, r, world, align) for r in range(world)]
        assert blocks[0][0] == 0 and blocks[-1][1] == count
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        assert all(start % align == 0 for start, stop in blocks if stop > start)


def test_sync_batchnorm_on_cpu_ranks_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastmem.distributed as distributed

    distributed.check_sync_bn(True, torch.device("cpu"))  # one process: nothing to synchronize
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    distributed.check_sync_bn(False, torch.device("cpu"))
    with pytest.raises(FastmemError, match="--sync-bn needs CUDA devices"):
        distributed.check_sync_bn(True, torch.device("cpu"))
