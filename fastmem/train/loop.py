"""`python -m fastmem.train`: train on random (or partially noisy) labels and probe every layer.

Owns the run: its directory (config.json, labels.npz, metrics.jsonl, checkpoint.pt, summary.json),
the training loop, checkpoints and resume. Data, labels, loaders, models and the probe are built
by their own modules; this file only wires them together.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastmem.data import ArrayDataset, canonical_name
from fastmem.data.iid_views import build_iid_view_pool
from fastmem.data.labels import RunLabels, load_labels, make_targets, save_labels
from fastmem.data.splits import load_run_splits
from fastmem.distributed import (
    barrier,
    broadcast_buffers_from_main,
    check_sync_bn,
    distributed_session,
    epoch_totals,
    is_main_rank,
    losses_of_all_ranks,
    per_rank_batch,
    rank_device,
    rank_info,
    wrap_data_parallel,
)
from fastmem.errors import fail, run_cli
from fastmem.io_utils import write_json_atomic
from fastmem.models import MODEL_NAMES, EncoderProjector, create_model
from fastmem.pipelines import PIPELINE_NAMES, AugmentSpec, ViewPool, make_loader
from fastmem.pipelines.view_pool import check_view_pool_pipeline
from fastmem.probe import probe_knn
from fastmem.run.checkpoint import (
    CHECKPOINT_NAME,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from fastmem.run.config import RESUMABLE_KNOBS, TrainConfig, load_run_config, parse_args
from fastmem.run.metrics import DiscardingMetricsLogger, MetricsLogger
from fastmem.runtime import autocast, resolve_device, resolve_precision, set_cpu_threads
from fastmem.train.mixing import check_mixing_knobs, mix_batch
from fastmem.train.reinit import check_init_knobs, init_from_checkpoint


@dataclass
class RunData:
    train: ArrayDataset
    probe_queries: ArrayDataset
    labels: RunLabels
    view_pool: ViewPool | None = None  # --iid-views: reserved same-class images per training image


def validate(cfg: TrainConfig) -> None:
    """Reject bad knob values and combinations before any work starts."""
    if cfg.epochs < 0:
        fail(f"--epochs must be >= 0, got {cfg.epochs}")
    if cfg.batch_size < 1:
        fail(f"--batch-size must be positive, got {cfg.batch_size}")
    if cfg.lr <= 0:
        fail(f"--lr must be positive, got {cfg.lr}")
    if cfg.checkpoint_every < 1:
        fail(f"--checkpoint-every must be >= 1, got {cfg.checkpoint_every}")
    if cfg.subset < 0 or cfg.probe_subset < 0 or cfg.workers < 0 or cfg.threads < 0:
        fail("--subset, --probe-subset, --workers and --threads must be >= 0")
    if not 0.0 <= cfg.label_noise <= 1.0:
        fail(f"--label-noise must be in [0, 1], got {cfg.label_noise}")
    if cfg.probe_project_dim < 0:
        fail(f"--probe-project-dim must be >= 0, got {cfg.probe_project_dim}")
    if cfg.probe_k < 1:
        fail(f"--probe-k must be >= 1, got {cfg.probe_k}")
    if cfg.probe_every < -1:
        fail(f"--probe-every must be >= -1, got {cfg.probe_every}")
    if cfg.pipeline not in PIPELINE_NAMES:
        fail(f"unknown pipeline {cfg.pipeline!r}; available: {', '.join(PIPELINE_NAMES)}")
    if cfg.model not in MODEL_NAMES:
        fail(f"unknown model {cfg.model!r}; known models: {', '.join(MODEL_NAMES)}")
    canonical_name(cfg.dataset)
    AugmentSpec.parse(cfg.augment)
    if cfg.iid_views < 0:
        fail(f"--iid-views must be >= 0, got {cfg.iid_views}")
    if cfg.iid_views:
        check_view_pool_pipeline(cfg.pipeline)
    check_mixing_knobs(cfg.mixup, cfg.cutmix)
    check_init_knobs(cfg.init_from, cfg.reinit, cfg.model, cfg.width, cfg.bottleneck_dim)
    device = resolve_device(cfg.device)
    resolve_precision(cfg.precision, device)


def resolve_run_dir(cfg: TrainConfig, explicit: set[str], resume: str | None) -> tuple[TrainConfig, Path, bool]:
    """Pick the run directory; when resuming, reload its config and apply only harmless overrides."""
    if resume is None:
        run_dir = Path(cfg.out or Path("runs") / cfg.run_name())
        if (run_dir / "config.json").exists():
            fail(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")
        return dataclasses.replace(cfg, out=str(run_dir)), run_dir, False
    run_dir = Path(resume)
    saved = load_run_config(run_dir)
    conflicting = sorted(
        name for name in explicit - RESUMABLE_KNOBS if getattr(cfg, name) != getattr(saved, name)
    )
    if conflicting:
        flags = ", ".join("--" + name.replace("_", "-") for name in conflicting)
        allowed = ", ".join("--" + name.replace("_", "-") for name in sorted(RESUMABLE_KNOBS - {"out"}))
        fail(f"{run_dir} was run with other values of {flags}; a resumed run may only change {allowed}")
    overrides = {name: getattr(cfg, name) for name in explicit & RESUMABLE_KNOBS if name != "out"}
    return dataclasses.replace(saved, out=str(run_dir), **overrides), run_dir, True


def load_run_data(cfg: TrainConfig, run_dir: Path, resuming: bool) -> RunData:
    """Training images (optionally a seeded subset), probe queries, and the run's labels."""
    splits = load_run_splits(cfg.dataset, cfg.data_dir, subset=cfg.subset, probe_subset=cfg.probe_subset,
                             image_size=cfg.image_size, seed=cfg.seed)
    train, test = splits.train, splits.test
    view_pool = build_iid_view_pool(splits, cfg.iid_views, cfg.seed) if cfg.iid_views else None
    labels = make_targets(train.labels, train.num_classes, cfg.label_noise, cfg.label_seed)
    labels_path = run_dir / "labels.npz"
    if resuming and labels_path.exists():
        saved = load_labels(labels_path)
        if not np.array_equal(saved.targets, labels.targets) or not np.array_equal(saved.true_labels, labels.true_labels):
            fail(f"{labels_path}: saved labels differ from the ones this config draws (data changed?)")
    elif is_main_rank():  # under torchrun only rank 0 writes files
        save_labels(labels_path, labels)
    return RunData(train, test, labels, view_pool)


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def compute_loss(kind: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """MSE between the output and the one-hot target (paper), or cross-entropy."""
    logits = logits.float()
    if kind == "mse":
        return F.mse_loss(logits, F.one_hot(targets, logits.shape[1]).float())
    return F.cross_entropy(logits, targets)


def should_probe(cfg: TrainConfig, epoch: int) -> bool:
    if cfg.probe_every < 0:
        return False
    return epoch == 0 or epoch == cfg.epochs or (cfg.probe_every > 0 and epoch % cfg.probe_every == 0)


def train(cfg: TrainConfig, explicit: set[str] | None = None, resume: str | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns the final summary (also written to summary.json)."""
    explicit = set(explicit if explicit is not None else {f.name for f in dataclasses.fields(cfg)})
    cfg, run_dir, resuming = resolve_run_dir(cfg, explicit, resume)
    validate(cfg)
    ranks = rank_info()  # torchrun: this process's rank and the world size (1 without torchrun)
    batch_per_rank = per_rank_batch(cfg.batch_size, ranks.world)  # --batch-size is global
    device = rank_device(resolve_device(cfg.device))
    check_sync_bn(cfg.sync_bn, device)
    dtype = resolve_precision(cfg.precision, device)
    if cfg.threads:
        set_cpu_threads(cfg.threads)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME) if resuming and (run_dir / CHECKPOINT_NAME).exists() else None

    barrier()  # every rank has checked the run directory before rank 0 writes into it
    if ranks.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    data = load_run_data(cfg, run_dir, resuming)

    torch.manual_seed(cfg.seed)
    height, width_px, channels = data.train.image_shape
    model: EncoderProjector = create_model(
        cfg.model, num_classes=data.train.num_classes, in_channels=channels, image_size=height,
        width=cfg.width, bottleneck_dim=cfg.bottleneck_dim,
    ).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if checkpoint is None and cfg.init_from:  # experiment J: trained weights, named parts freshly initialized
        init_from_checkpoint(model, cfg.init_from, cfg.reinit)
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_epoch = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_state(checkpoint["rng"])
        start_epoch = int(checkpoint["epoch"])
    parallel_model = wrap_data_parallel(model, device, cfg.sync_bn)  # DDP when world > 1; shares `model`'s weights
    step_model = torch.compile(parallel_model) if cfg.compile else parallel_model

    loader = make_loader(
        cfg.pipeline, data.train.images, data.labels.targets, augment=cfg.augment, batch_size=batch_per_rank,
        rank=ranks.rank, world=ranks.world, device=device, seed=cfg.seed, label_seed=cfg.label_seed, workers=cfg.workers,
        channels_last=cfg.channels_last, num_classes=data.train.num_classes, view_pool=data.view_pool,
    )
    true_labels = torch.as_tensor(data.labels.true_labels, device=device)
    if ranks.is_main:
        write_json_atomic(run_dir / "config.json", cfg.to_dict())  # only once everything is in place
    metrics = MetricsLogger(run_dir, cfg.tensorboard) if ranks.is_main else DiscardingMetricsLogger()
    metrics.truncate_after(start_epoch)

    def probe(epoch: int) -> dict[str, float]:
        broadcast_buffers_from_main(model)  # every rank probes rank 0's model
        accuracy = probe_knn(
            model, data.train.images, data.train.labels, data.probe_queries.images, data.probe_queries.labels,
            device=device, dtype=dtype, k=cfg.probe_k, vote=cfg.probe_vote, num_classes=data.train.num_classes,
            project_dim=cfg.probe_project_dim, distributed=ranks.world > 1, extract_backend=cfg.extract_backend,
            engine_dir=None,  # weights change every probe: engines are built in memory, cached only by the probe CLI
        )
        print(f"  k-NN @ epoch {epoch}: " + "  ".join(f"{k} {v:.1%}" for k, v in accuracy.items()), flush=True)
        return {f"knn/{name}": value for name, value in accuracy.items()}

    def write_checkpoint(epoch: int) -> None:
        if not ranks.is_main:
            return
        save_checkpoint(run_dir / CHECKPOINT_NAME, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "rng": capture_rng_state(), "config": json.dumps(cfg.to_dict()),
        })

    print(f"run {run_dir}: {cfg.model} on {cfg.dataset} ({len(data.train)} images, {cfg.augment} aug, "
          f"label noise {cfg.label_noise:g}) on {device}, precision {dtype or 'fp32'}"
          + (f", {ranks.world} ranks × batch {batch_per_rank}" if ranks.world > 1 else ""), flush=True)
    if start_epoch == 0 and should_probe(cfg, 0):
        metrics.log({"epoch": 0, **probe(0)})
    steps = len(loader) if not cfg.max_steps_per_epoch else min(len(loader), cfg.max_steps_per_epoch)
    record: dict[str, Any] = {}
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        record = run_epoch(cfg, step_model, optimizer, scaler, loader, true_labels, device, dtype, epoch, steps)
        if should_probe(cfg, epoch):
            record.update(probe(epoch))
        metrics.log(record)
        if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
            write_checkpoint(epoch)
    if start_epoch >= cfg.epochs and not (run_dir / CHECKPOINT_NAME).exists():
        write_checkpoint(cfg.epochs)
    metrics.close()
    summary = {"epochs": cfg.epochs, "final": record, "run_dir": str(run_dir), "world_size": ranks.world}
    if ranks.is_main:
        write_json_atomic(run_dir / "summary.json", summary)
    return summary


def run_epoch(
    cfg: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    loader: Any, true_labels: torch.Tensor, device: torch.device, dtype: torch.dtype | None, epoch: int, steps: int,
) -> dict[str, Any]:
    """One pass over the loader; stops the run on a non-finite loss, naming the epoch and step."""
    model.train()
    loader.set_epoch(epoch)
    losses: list[torch.Tensor] = []
    fit_random = torch.zeros((), device=device, dtype=torch.int64)
    fit_true = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    started = time.perf_counter()
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress or not is_main_rank(), leave=False, file=sys.stderr)
    batches = iter(loader)
    for step in range(1, steps + 1):
        batch = next(batches)
        with autocast(device, dtype):
            output = model(mix_batch(batch.images, mixup=cfg.mixup, cutmix=cfg.cutmix, seed=cfg.seed, epoch=epoch,
                                     step=step))
        loss = compute_loss(cfg.loss, output, batch.targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.detach())
        predicted = output.detach().argmax(dim=1)
        fit_random += (predicted == batch.targets).sum()
        fit_true += (predicted == true_labels[batch.indices.to(device)]).sum()
        seen += batch.images.shape[0]
        if step % 25 == 0 or step == steps:  # a host sync only every few steps
            check_finite(losses, epoch, step)
        bar.update(1)
    bar.close()
    del batches
    elapsed = time.perf_counter() - started
    mean_loss, fit_random, fit_true, seen = epoch_totals(losses, fit_random, fit_true, seen)  # over all ranks
    record = {
        "epoch": epoch,
        "loss": mean_loss,
        "train_acc_random": float(fit_random) / max(seen, 1),
        "train_acc_true": float(fit_true) / max(seen, 1),
        "images_per_s": seen / elapsed if elapsed > 0 else 0.0,
        "seconds": elapsed,
    }
    print(f"epoch {epoch}/{cfg.epochs}  loss {record['loss']:.4f}  fit(random labels) {record['train_acc_random']:.1%}  "
          f"agree(true labels) {record['train_acc_true']:.1%}  {record['images_per_s']:.0f} img/s", flush=True)
    return record


def check_finite(losses: list[torch.Tensor], epoch: int, step: int) -> None:
    """Fail at the first non-finite loss, naming its epoch and step; the last checkpoint stays untouched."""
    finite = torch.isfinite(losses_of_all_ranks(torch.stack(losses)))  # all ranks stop together
    if not bool(finite.all()):
        first_bad = int((~finite).nonzero()[0])
        fail(f"non-finite loss at epoch {epoch}, step {first_bad + 1}; stopping (the last good checkpoint is kept)")


def main(argv: Sequence[str] | None = None) -> int:
    cfg, explicit, resume = parse_args(argv)
    with distributed_session():  # joins the process group under torchrun
        train(cfg, explicit, resume)
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)


if __name__ == "__main__":
    cli()
