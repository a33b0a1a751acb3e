"""`python -m fastmem.train`: train on random (or partially noisy) labels and probe every layer.

Owns the run: its directory (config.json, labels.npz, metrics.jsonl, checkpoint.pt, summary.json),
the training loop, checkpoints and resume. Data, labels, loaders, models and the probe are built
by their own modules; this file only wires them together: `build_run` makes a `Run`, `run_epochs`
loops over its epochs, `run_epoch` over one epoch's batches, and `train_step` is the one optimisation
step (the benchmarks in benchmarks/train_step.py and loader_wait.py time it as it is).
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
    RankInfo,
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
from fastmem.pipelines import AugmentSpec, ViewPool, check_pipeline, make_loader
from fastmem.probe import probe_knn
from fastmem.run.checkpoint import (
    CHECKPOINT_NAME,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from fastmem.run.config import RESUMABLE_KNOBS, TrainConfig, load_run_config, parse_args
from fastmem.run.metrics import DiscardingMetricsLogger, MetricsLogger, knn_key
from fastmem.runtime import autocast, resolve_device, resolve_precision, set_cpu_threads
from fastmem.train.mixing import check_mixing_knobs, mix_batch
from fastmem.train.reinit import check_init_knobs, init_from_checkpoint


@dataclass
class RunData:
    train: ArrayDataset
    probe_queries: ArrayDataset
    labels: RunLabels
    view_pool: ViewPool | None = None  # --iid-views: reserved same-class images per training image


def validate(cfg: TrainConfig) -> AugmentSpec:
    """Reject bad knob values and combinations before any work starts; the parsed augmentation spec."""
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
    if not cfg.probe_temperature > 0:
        fail(f"--probe-temperature must be positive, got {cfg.probe_temperature}")
    if cfg.probe_every < -1:
        fail(f"--probe-every must be >= -1, got {cfg.probe_every}")
    if cfg.model not in MODEL_NAMES:
        fail(f"unknown model {cfg.model!r}; known models: {', '.join(MODEL_NAMES)}")
    canonical_name(cfg.dataset)
    spec = AugmentSpec.parse(cfg.augment)
    if cfg.iid_views < 0:
        fail(f"--iid-views must be >= 0, got {cfg.iid_views}")
    check_pipeline(cfg.pipeline, spec, view_pool=cfg.iid_views > 0)  # augment ops and --iid-views, before any data
    check_mixing_knobs(cfg.mixup, cfg.cutmix)
    check_init_knobs(cfg.init_from, cfg.reinit, cfg.model, cfg.width, cfg.bottleneck_dim)
    device = resolve_device(cfg.device)
    resolve_precision(cfg.precision, device)
    return spec


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


@dataclass
class Run:
    """A built run, ready for its epoch loop: config, directory, model, optimizer, loader and logger."""

    cfg: TrainConfig
    run_dir: Path
    ranks: RankInfo
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype (None = fp32)
    data: RunData
    model: EncoderProjector  # the module itself: checkpoints and probes read it
    step_model: torch.nn.Module  # what the training steps call: `model` under DDP (world > 1) and/or torch.compile
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    augment: AugmentSpec
    loader: Any
    true_labels: torch.Tensor  # on `device`, indexed by sample index
    metrics: MetricsLogger
    start_epoch: int  # the last completed epoch (0 for a fresh run)
    batch_per_rank: int


def build_run(cfg: TrainConfig, explicit: set[str] | None = None, resume: str | None = None) -> Run:
    """Resolve and check the config, load data and labels, build model, optimizer and loader, restore a checkpoint."""
    explicit = set(explicit if explicit is not None else {f.name for f in dataclasses.fields(cfg)})
    cfg, run_dir, resuming = resolve_run_dir(cfg, explicit, resume)
    augment = validate(cfg)  # the loader gets the parsed spec; config.json keeps the text
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
    height, _, channels = data.train.image_shape
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
        cfg.pipeline, data.train.images, data.labels.targets, augment=augment, batch_size=batch_per_rank,
        rank=ranks.rank, world=ranks.world, device=device, seed=cfg.seed, label_seed=cfg.label_seed, workers=cfg.workers,
        channels_last=cfg.channels_last, num_classes=data.train.num_classes, view_pool=data.view_pool,
    )
    true_labels = torch.as_tensor(data.labels.true_labels, device=device)
    if ranks.is_main:
        write_json_atomic(run_dir / "config.json", cfg.to_dict())  # only once everything is in place
    metrics = MetricsLogger(run_dir, cfg.tensorboard) if ranks.is_main else DiscardingMetricsLogger()
    metrics.truncate_after(start_epoch)
    return Run(cfg, run_dir, ranks, device, dtype, data, model, step_model, optimizer, scaler, augment, loader,
               true_labels, metrics, start_epoch, batch_per_rank)


def probe_run(run: Run, epoch: int) -> dict[str, float]:
    """The in-training k-NN probe of every probe point, as metrics keys (every rank probes rank 0's model)."""
    cfg, data = run.cfg, run.data
    broadcast_buffers_from_main(run.model)
    accuracy = probe_knn(
        run.model, data.train.images, data.train.labels, data.probe_queries.images, data.probe_queries.labels,
        device=run.device, dtype=run.dtype, k=cfg.probe_k, vote=cfg.probe_vote, temperature=cfg.probe_temperature,
        num_classes=data.train.num_classes, project_dim=cfg.probe_project_dim, distributed=run.ranks.world > 1,
        extract_backend=cfg.extract_backend,
        engine_dir=None,  # weights change every probe: engines are built in memory, cached only by the probe CLI
    )
    print(f"  k-NN @ epoch {epoch}: " + "  ".join(f"{k} {v:.1%}" for k, v in accuracy.items()), flush=True)
    return {knn_key(name): value for name, value in accuracy.items()}


def write_checkpoint(run: Run, epoch: int) -> None:
    """Save model, optimizer, scaler, RNG states and config after `epoch` (rank 0 only)."""
    if not run.ranks.is_main:
        return
    save_checkpoint(run.run_dir / CHECKPOINT_NAME, {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
        "epoch": epoch, "rng": capture_rng_state(), "config": json.dumps(run.cfg.to_dict()),
    })


def train(cfg: TrainConfig, explicit: set[str] | None = None, resume: str | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns the final summary (also written to summary.json)."""
    run = build_run(cfg, explicit, resume)
    cfg = run.cfg
    print(f"run {run.run_dir}: {cfg.model} on {cfg.dataset} ({len(run.data.train)} images, {cfg.augment} aug, "
          f"label noise {cfg.label_noise:g}) on {run.device}, precision {run.dtype or 'fp32'}"
          + (f", {run.ranks.world} ranks × batch {run.batch_per_rank}" if run.ranks.world > 1 else ""), flush=True)
    record = run_epochs(run)
    run.metrics.close()
    summary = {"epochs": cfg.epochs, "final": record, "run_dir": str(run.run_dir), "world_size": run.ranks.world}
    if run.ranks.is_main:
        write_json_atomic(run.run_dir / "summary.json", summary)
    return summary


def run_epochs(run: Run) -> dict[str, Any]:
    """The epoch loop from the run's start epoch: train, probe, log, checkpoint; returns the last epoch's record."""
    cfg = run.cfg
    if run.start_epoch == 0 and should_probe(cfg, 0):
        run.metrics.log({"epoch": 0, **probe_run(run, 0)})
    steps = len(run.loader) if not cfg.max_steps_per_epoch else min(len(run.loader), cfg.max_steps_per_epoch)
    record: dict[str, Any] = {}
    for epoch in range(run.start_epoch + 1, cfg.epochs + 1):
        record = run_epoch(run, epoch, steps)
        if should_probe(cfg, epoch):
            record.update(probe_run(run, epoch))
        run.metrics.log(record)
        if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
            write_checkpoint(run, epoch)
    if run.start_epoch >= cfg.epochs and not (run.run_dir / CHECKPOINT_NAME).exists():
        write_checkpoint(run, cfg.epochs)
    return record


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, images: torch.Tensor,
    targets: torch.Tensor, loss_kind: str, device: torch.device, dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step: forward under autocast, loss, zero_grad, (scaled) backward, step, scaler update.

    Returns (loss, output), both still attached to the graph; the benchmarks time this very function.
    """
    with autocast(device, dtype):
        output = model(images)
    loss = compute_loss(loss_kind, output, targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, output


def run_epoch(run: Run, epoch: int, steps: int) -> dict[str, Any]:
    """One pass of `steps` batches over the loader; stops the run on a non-finite loss, naming the epoch and step."""
    cfg, device = run.cfg, run.device
    run.step_model.train()
    run.loader.set_epoch(epoch)
    losses: list[torch.Tensor] = []
    fit_random = torch.zeros((), device=device, dtype=torch.int64)
    fit_true = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    started = time.perf_counter()
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress or not is_main_rank(), leave=False, file=sys.stderr)
    batches = iter(run.loader)
    for step in range(1, steps + 1):
        batch = next(batches)
        images = mix_batch(batch.images, mixup=cfg.mixup, cutmix=cfg.cutmix, seed=cfg.seed, epoch=epoch, step=step)
        loss, output = train_step(run.step_model, run.optimizer, run.scaler, images, batch.targets, cfg.loss, device,
                                  run.dtype)
        losses.append(loss.detach())
        predicted = output.detach().argmax(dim=1)
        fit_random += (predicted == batch.targets).sum()
        fit_true += (predicted == run.true_labels[batch.indices.to(device)]).sum()
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
