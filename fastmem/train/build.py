"""Building a training run: resolve its directory and config, check it, load its data and labels, build
model, optimizer and loader, and restore a checkpoint (loop.py then runs its epochs).

Owns `Run` (everything the epoch loop needs) and `build_run`; `validate` rejects bad knobs before any
work, and the run directory's lock is taken before anything is read or written in it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmem.data import ArrayDataset, canonical_name
from fastmem.data.iid_views import build_iid_view_pool
from fastmem.data.labels import RunLabels, load_labels, make_targets, save_labels
from fastmem.data.splits import load_run_splits
from fastmem.distributed import (
    RankInfo,
    agree_with_main,
    barrier,
    check_sync_bn,
    is_main_rank,
    per_rank_batch,
    rank_device,
    rank_info,
    wrap_data_parallel,
)
from fastmem.errors import fail
from fastmem.io_utils import write_json_atomic
from fastmem.models import MODEL_NAMES, EncoderProjector, create_model
from fastmem.pipelines import AugmentSpec, Loader, ViewPool, check_pipeline, make_loader
from fastmem.run.checkpoint import (
    CHECKPOINT_NAME,
    check_resumable,
    checkpoint_config,
    load_checkpoint,
    restore_training_state,
)
from fastmem.run.config import RESOLVED_KEY, RESUMABLE_KNOBS, TrainConfig, load_resolved, load_run_config
from fastmem.run.lock import RunLock, hold_run_lock, remove_stale_temps
from fastmem.run.metrics import DiscardingMetricsLogger, MetricsLogger, read_metrics
from fastmem.runtime import (
    precision_dtype,
    precision_name,
    precision_reason,
    resolve_device,
    resolve_precision,
    set_cpu_threads,
)
from fastmem.train.cuda_graph import check_cuda_graph
from fastmem.train.interrupt import StopSignals
from fastmem.train.mixing import check_mixing_knobs
from fastmem.train.reinit import check_init_knobs, init_from_checkpoint


@dataclass
class RunData:
    train: ArrayDataset
    probe_queries: ArrayDataset
    labels: RunLabels
    view_pool: ViewPool | None = None  # --iid-views: reserved same-class images per training image
    probe_reference: ArrayDataset | None = None  # the probe's k-NN reference (true labels); None: `train`

    @property
    def reference(self) -> ArrayDataset:
        return self.train if self.probe_reference is None else self.probe_reference


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
    if cfg.iid_views < -1:
        fail(f"--iid-views must be >= 0, or -1 for all same-class images, got {cfg.iid_views}")
    if cfg.iid_views and not cfg.subset:
        fail(f"--iid-views {cfg.iid_views} needs a --subset: the views are drawn from the training images outside "
             "it, and without one every image is an anchor")
    if cfg.probe_reference < 0:
        fail(f"--probe-reference must be >= 0, got {cfg.probe_reference}")
    for flag, seed in (("--data-seed", cfg.data_seed), ("--label-seed", cfg.label_seed)):
        if seed < 0:
            fail(f"{flag} must be >= 0 (a seed of numpy's generators), got {seed}")
    check_pipeline(cfg.pipeline, spec, view_pool=cfg.iid_views != 0)  # augment ops and --iid-views, before any data
    check_mixing_knobs(cfg.mixup, cfg.cutmix)
    check_init_knobs(cfg.init_from, cfg.reinit, cfg.model, cfg.width, cfg.bottleneck_dim)
    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)
    if cfg.cuda_graph:
        check_cuda_graph(device, dtype, cfg.compile, cfg.compile_mode, rank_info().world)
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


def check_same_run(checkpoint: dict[str, Any], path: Path, cfg: TrainConfig) -> None:
    """Fail, naming the knobs, when the checkpoint was written by a run of another config than config.json's."""
    saved = checkpoint_config(checkpoint, path)
    if saved is None:  # checkpoints that predate the saved config
        return
    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RESUMABLE_KNOBS]
    differing = [name for name in fields if name in saved and saved[name] != getattr(cfg, name)]
    if differing:
        knobs = ", ".join(f"--{name.replace('_', '-')} {saved[name]!r} (config.json: {getattr(cfg, name)!r})"
                          for name in differing)
        fail(f"{path}: written by another run ({knobs}); resume from that run's own directory or start afresh")


def load_run_data(cfg: TrainConfig, run_dir: Path, resuming: bool) -> RunData:
    """Training images (optionally a seeded subset), probe queries, and the run's labels."""
    splits = load_run_splits(cfg.dataset, cfg.data_dir, subset=cfg.subset, probe_subset=cfg.probe_subset,
                             image_size=cfg.image_size, seed=cfg.data_seed, probe_reference=cfg.probe_reference)
    train, test = splits.train, splits.test
    view_pool = build_iid_view_pool(splits, cfg.iid_views, cfg.data_seed) if cfg.iid_views else None
    labels = make_targets(train.labels, train.num_classes, cfg.label_noise, cfg.label_seed)
    labels_path = run_dir / "labels.npz"
    if resuming and labels_path.exists():
        saved = load_labels(labels_path)
        if not np.array_equal(saved.targets, labels.targets) or not np.array_equal(saved.true_labels, labels.true_labels):
            fail(f"{labels_path}: saved labels differ from the ones this config draws (data changed?)")
    elif is_main_rank():  # under torchrun only rank 0 writes files
        save_labels(labels_path, labels)
    return RunData(train, test, labels, view_pool, splits.reference)


def adam_flags(device: torch.device, cuda_graph: bool) -> dict[str, bool]:
    """Adam's execution flags: fused on CUDA (one kernel for every parameter, no host sync), capturable too under
    --cuda-graph; none on a CPU, whose Adam stays torch's default (foreach) path."""
    if device.type != "cuda":
        return {}
    return {"fused": True, "capturable": True} if cuda_graph else {"fused": True}


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The run's optimizer over `model`'s parameters (Adam fused on CUDA; SGD as torch builds it)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                **adam_flags(device, cfg.cuda_graph))
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


EXECUTION_FLAGS = ("fused", "capturable", "foreach")


def keep_execution_flags(optimizer: torch.optim.Optimizer) -> None:
    """After a checkpoint's optimizer state is loaded: this run's fused/capturable/foreach flags again (load_state_dict
    takes the saved run's, e.g. a CPU run's on CUDA), and each Adam `step` where they need it (on the
    parameter's device when fused or capturable, else on the CPU)."""
    for group in optimizer.param_groups:
        group.update({key: optimizer.defaults[key] for key in EXECUTION_FLAGS if key in optimizer.defaults})
        on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            step = optimizer.state.get(param, {}).get("step")
            if not isinstance(step, torch.Tensor):
                continue
            target = param.device if on_device else torch.device("cpu")
            if step.device != target:
                optimizer.state[param]["step"] = step.to(device=target, dtype=torch.float32)


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
    loader: Loader
    true_labels: torch.Tensor  # on `device`, indexed by sample index
    metrics: MetricsLogger
    start_epoch: int  # the last completed epoch (0 for a fresh run)
    batch_per_rank: int
    resume_point: dict[str, Any] | None = None  # a mid-epoch checkpoint's `in_progress`, plus its `rng`
    stop: StopSignals = dataclasses.field(default_factory=lambda: StopSignals(enabled=False))


def resolve_run_precision(precision: str, device: torch.device,
                          recorded: dict[str, Any]) -> tuple[torch.dtype | None, dict[str, str]]:
    """The autocast dtype a run trains in and config.json's `resolved` record of it (device, precision, reason).

    A resume on the same device type keeps what the run `recorded`; under torchrun every rank takes rank 0's
    choice, so ranks never train in different precisions (`auto` on a CPU is decided per machine).
    """
    same_device = recorded.get("device") == device.type
    dtype = resolve_precision(precision, device, recorded.get("precision") if same_device else None)
    resolved = {"device": device.type, "precision": precision_name(dtype),
                "precision_reason": precision_reason(precision, device, dtype, resumed=same_device)}
    resolved = agree_with_main(resolved)
    return precision_dtype(resolved["precision"]), resolved


def build_run(cfg: TrainConfig, explicit: set[str] | None = None, resume: str | None = None) -> Run:
    """Resolve and check the config, load data and labels, build model, optimizer and loader, restore a checkpoint."""
    explicit = set(explicit if explicit is not None else {f.name for f in dataclasses.fields(cfg)})
    cfg, run_dir, resuming = resolve_run_dir(cfg, explicit, resume)
    augment = validate(cfg)  # the loader gets the parsed spec; config.json keeps the text
    ranks = rank_info()  # torchrun: this process's rank and the world size (1 without torchrun)
    batch_per_rank = per_rank_batch(cfg.batch_size, ranks.world)  # --batch-size is global
    device = rank_device(resolve_device(cfg.device))
    check_sync_bn(cfg.sync_bn, device)
    dtype, resolved = resolve_run_precision(cfg.precision, device, load_resolved(run_dir) if resuming else {})
    if cfg.threads:
        set_cpu_threads(cfg.threads)
    lock: RunLock | None = None
    if ranks.is_main:  # one process per run directory (under torchrun rank 0 holds it for all ranks)
        lock = hold_run_lock(run_dir)
        remove_stale_temps(run_dir)  # temp files of interrupted writes: safe to delete only under the lock
    try:
        return _build_in(cfg, run_dir, resuming, augment, ranks, batch_per_rank, device, dtype, resolved)
    except BaseException:
        if lock is not None:  # an in-process caller (the sweep) may take the directory on afterwards
            lock.release()
        raise


def _build_in(cfg: TrainConfig, run_dir: Path, resuming: bool, augment: AugmentSpec, ranks: RankInfo,
              batch_per_rank: int, device: torch.device, dtype: torch.dtype | None, resolved: dict[str, str]) -> Run:
    """`build_run` once the run directory is held: nothing in it is written until every input checked out."""
    checkpoint_path = run_dir / CHECKPOINT_NAME
    checkpoint = load_checkpoint(checkpoint_path) if resuming and checkpoint_path.exists() else None
    if checkpoint is not None:  # before any data: a foreign or incomplete checkpoint fails at once
        check_resumable(checkpoint, checkpoint_path)
        check_same_run(checkpoint, checkpoint_path, cfg)
    if resuming and ranks.is_main:
        read_metrics(run_dir / "metrics.jsonl")  # a garbage line fails now; a torn last one warns (dropped below)

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
    optimizer = build_optimizer(cfg, model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_epoch = 0
    if checkpoint is not None:
        start_epoch = restore_training_state(checkpoint, checkpoint_path, model, optimizer, scaler)
        keep_execution_flags(optimizer)
    resume_point = None
    if checkpoint is not None and checkpoint.get("in_progress") is not None:
        resume_point = {**checkpoint["in_progress"], "rng": checkpoint["rng"]}
    parallel_model = wrap_data_parallel(model, device, cfg.sync_bn)  # DDP when world > 1; shares `model`'s weights
    step_model = torch.compile(parallel_model, mode=cfg.compile_mode) if cfg.compile else parallel_model

    loader = make_loader(
        cfg.pipeline, data.train.images, data.labels.targets, augment=augment, batch_size=batch_per_rank,
        rank=ranks.rank, world=ranks.world, device=device, seed=cfg.seed, label_seed=cfg.label_seed, workers=cfg.workers,
        channels_last=cfg.channels_last, num_classes=data.train.num_classes, view_pool=data.view_pool,
    )
    true_labels = torch.as_tensor(data.labels.true_labels, device=device)
    if ranks.is_main:
        # Only once everything is in place; `resolved` records what the `auto` choices became on this machine.
        write_json_atomic(run_dir / "config.json", {**cfg.to_dict(), RESOLVED_KEY: resolved})
    metrics = MetricsLogger(run_dir, cfg.tensorboard) if ranks.is_main else DiscardingMetricsLogger()
    # Records past the checkpoint are redone; without one, so is the epoch-0 probe (a run killed before its first).
    metrics.truncate_after(start_epoch if checkpoint is not None else -1)
    return Run(cfg, run_dir, ranks, device, dtype, data, model, step_model, optimizer, scaler, loader,
               true_labels, metrics, start_epoch, batch_per_rank, resume_point)
