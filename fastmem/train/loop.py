"""`python -m fastmem.train`: train on random (or partially noisy) labels and probe every layer.

Owns the run's loop: its epochs, probes, checkpoints and resume, and what it writes to its directory
(metrics.jsonl, checkpoint.pt, summary.json). `build_run` (build.py) makes a `Run`, `run_epochs`
loops over its epochs, `run_epoch` over one epoch's batches, and `train_step` is the one optimisation
step (the benchmarks in benchmarks/train_step.py and loader_wait.py time it as it is); under --cuda-graph
`make_step` replays it from a CUDA graph instead (cuda_graph.py).

Loss and fit counters stay on the device; the host reads them every 25 steps on a CPU and once per epoch
on CUDA (no sync per step), to stop at the first non-finite loss before any checkpoint is written after it.

SIGINT, SIGTERM and SIGUSR1 (single-process runs; see interrupt.py) stop the run after the step in
flight with a checkpoint at that step: it keeps `epoch` = the last completed epoch and adds
`in_progress` = {epoch, step, the partial epoch's loss/fit accumulators}, so `--resume` replays the
epoch's order, skips the steps done and logs the same epoch record as an uninterrupted run.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastmem.distributed import (
    broadcast_buffers_from_main,
    distributed_session,
    epoch_totals,
    is_main_rank,
    losses_of_all_ranks,
)
from fastmem.errors import fail, run_cli
from fastmem.io_utils import write_json_atomic
from fastmem.probe import ProbeResult, probe_predictions
from fastmem.run.checkpoint import (
    CHECKPOINT_NAME,
    capture_rng_state,
    restore_rng_state,
    save_checkpoint,
)
from fastmem.run.config import TrainConfig, parse_args
from fastmem.run.lock import release_run_lock
from fastmem.run.metrics import knn_key
from fastmem.run.predictions import write_predictions
from fastmem.runtime import autocast
from fastmem.train.build import Run, build_run
from fastmem.train.cuda_graph import SELF_GRAPHING_COMPILE_MODES, CudaGraphStep, StepFn
from fastmem.train.interrupt import Interrupted, StopSignals
from fastmem.train.mixing import mix_batch


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


def probe_run(run: Run, epoch: int) -> tuple[dict[str, Any], ProbeResult]:
    """The in-training k-NN probe of every probe point, as metrics keys (every rank probes rank 0's model), and
    its per-query predictions (kept by `keep_predictions` once the metrics record is written)."""
    cfg, data = run.cfg, run.data
    broadcast_buffers_from_main(run.model)
    result = probe_predictions(
        run.model, data.reference.images, data.reference.labels, data.probe_queries.images, data.probe_queries.labels,
        device=run.device, dtype=run.dtype, k=cfg.probe_k, vote=cfg.probe_vote, temperature=cfg.probe_temperature,
        num_classes=data.train.num_classes, project_dim=cfg.probe_project_dim, distributed=run.ranks.world > 1,
        extract_backend=cfg.extract_backend,
        engine_dir=None,  # weights change every probe: engines are built in memory, cached only by the probe CLI
    )
    accuracy = result.accuracy()
    print(f"  k-NN @ epoch {epoch}: " + "  ".join(f"{k} {v:.1%}" for k, v in accuracy.items()), flush=True)
    return {**{knn_key(name): value for name, value in accuracy.items()}, "probe_queries": int(result.truth.size)}, result


def keep_predictions(run: Run, epoch: int, result: ProbeResult | None) -> None:
    """Rank 0 keeps a probe's per-query predictions (RUN_DIR/probe_predictions/) for the reports' intervals."""
    if result is not None and run.ranks.is_main:
        write_predictions(run.run_dir, epoch, result.predictions, result.truth)


def write_checkpoint(run: Run, epoch: int, in_progress: dict[str, Any] | None = None) -> None:
    """Save model, optimizer, scaler, RNG states and config after `epoch` (rank 0 only).

    `in_progress`: the step reached in epoch `epoch + 1` and its accumulators (a checkpoint written on a signal).
    """
    if not run.ranks.is_main:
        return
    payload = {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
        "epoch": epoch, "rng": capture_rng_state(), "config": json.dumps(run.cfg.to_dict()),
    }
    if in_progress is not None:
        payload["in_progress"] = in_progress
    save_checkpoint(run.run_dir / CHECKPOINT_NAME, payload)


def train(cfg: TrainConfig, explicit: set[str] | None = None, resume: str | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns the final summary (also written to summary.json)."""
    run = build_run(cfg, explicit, resume)
    try:
        return _train_built(run)
    finally:
        release_run_lock(run.run_dir)  # in-process callers hand the directory on; a CLI exits now anyway


def _train_built(run: Run) -> dict[str, Any]:
    """The epoch loop of a built run, under the stop signals; the summary."""
    cfg = run.cfg
    print(f"run {run.run_dir}: {cfg.model} on {cfg.dataset} ({len(run.data.train)} images, {cfg.augment} aug, "
          f"label noise {cfg.label_noise:g}) on {run.device}, precision {run.dtype or 'fp32'}"
          + (f", {run.ranks.world} ranks × batch {run.batch_per_rank}" if run.ranks.world > 1 else ""), flush=True)
    # A stop signal from here on finishes the step in flight and writes a checkpoint at it (one process only).
    with StopSignals(enabled=run.ranks.world == 1) as run.stop:
        try:
            record = run_epochs(run)
        finally:
            run.metrics.close()
            run.loader.close()  # its worker processes, threads or pipelines
    summary = {"epochs": cfg.epochs, "final": record, "run_dir": str(run.run_dir), "world_size": run.ranks.world}
    if run.ranks.is_main:
        write_json_atomic(run.run_dir / "summary.json", summary)
    return summary


def run_epochs(run: Run) -> dict[str, Any]:
    """The epoch loop from the run's start epoch: train, probe, log, checkpoint; returns the last epoch's record."""
    cfg = run.cfg
    if run.start_epoch == 0 and run.resume_point is None and should_probe(cfg, 0):
        probed, result = probe_run(run, 0)
        run.metrics.log({"epoch": 0, **probed})
        keep_predictions(run, 0, result)
    steps = len(run.loader) if not cfg.max_steps_per_epoch else min(len(run.loader), cfg.max_steps_per_epoch)
    record: dict[str, Any] = {}
    step = make_step(run)  # one for the whole run: a CUDA graph is captured once
    for epoch in range(run.start_epoch + 1, cfg.epochs + 1):
        resume_point = run.resume_point if epoch == run.start_epoch + 1 else None
        record = run_epoch(run, epoch, steps, resume_point, step)
        result = None
        if should_probe(cfg, epoch):
            probed, result = probe_run(run, epoch)
            record.update(probed)
        run.metrics.log(record)
        keep_predictions(run, epoch, result)
        written = epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs
        if written:
            write_checkpoint(run, epoch)
        if run.stop.requested is not None and epoch < cfg.epochs:  # a signal during the probe or the logging
            if not written:
                write_checkpoint(run, epoch)
            raise Interrupted(run.stop.requested, epoch, steps, str(run.run_dir))
    if run.start_epoch >= cfg.epochs and not (run.run_dir / CHECKPOINT_NAME).exists():
        write_checkpoint(run, cfg.epochs)
    return record


# Steps between host checks of the losses on a CPU (on CUDA: once per epoch, and before any checkpoint).
FINITE_CHECK_STEPS = 25


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


def make_step(run: Run) -> StepFn:
    """The run's optimisation step as (images, targets) -> (loss, output): `train_step`, or its CUDA-graph replay."""
    cfg = run.cfg
    if cfg.cuda_graph:
        return CudaGraphStep(run.step_model, run.optimizer, functools.partial(compute_loss, cfg.loss), run.dtype)

    new_step = cfg.compile and cfg.compile_mode in SELF_GRAPHING_COMPILE_MODES  # Inductor's own CUDA graphs

    def eager(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if new_step:  # each call is a new step: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        return train_step(run.step_model, run.optimizer, run.scaler, images, targets, cfg.loss, run.device, run.dtype)

    return eager


def run_epoch(run: Run, epoch: int, steps: int, resume_point: dict[str, Any] | None = None,
              step_fn: StepFn | None = None) -> dict[str, Any]:
    """One pass of `steps` batches over the loader; stops the run on a non-finite loss, naming the epoch and step.

    `resume_point` (a mid-epoch checkpoint's): skip the steps it did, continue its accumulators and RNG
    state. After a stop signal, the step in flight ends, a checkpoint is written there and `Interrupted` raised.
    `step_fn`: the run's step (`make_step`; made here when not given).
    """
    cfg, device = run.cfg, run.device
    step_fn = step_fn or make_step(run)
    # Host reads of the losses (syncs): every few steps on a CPU, where they cost nothing, once per epoch on CUDA.
    check_every = FINITE_CHECK_STEPS if device.type != "cuda" else max(steps, 1)
    run.step_model.train()
    run.loader.set_epoch(epoch)
    losses: list[torch.Tensor] = []
    fit_random = torch.zeros((), device=device, dtype=torch.int64)
    fit_true = torch.zeros((), device=device, dtype=torch.int64)
    seen, done, earlier_seconds = 0, 0, 0.0
    batches = iter(run.loader)
    if resume_point is not None:
        done = int(resume_point["step"])
        if int(resume_point["epoch"]) != epoch or not 0 <= done <= steps:
            fail(f"{run.run_dir / CHECKPOINT_NAME}: its step {done} of epoch {resume_point['epoch']} does not fit "
                 f"epoch {epoch} of {steps} steps")
        for _ in range(done):  # the order of (seed, epoch) is fixed: replay it up to where the checkpoint stopped
            next(batches)
        losses = [loss.to(device) for loss in resume_point["losses"].unbind()]
        fit_random, fit_true = resume_point["fit_random"].to(device), resume_point["fit_true"].to(device)
        seen, earlier_seconds = int(resume_point["seen"]), float(resume_point["seconds"])
        restore_rng_state(resume_point["rng"])  # after the replay, which may draw from the global RNG
    started = time.perf_counter()
    bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress or not is_main_rank(),
               leave=False, file=sys.stderr)
    for step in range(done + 1, steps + 1):
        batch = next(batches)
        images = mix_batch(batch.images, mixup=cfg.mixup, cutmix=cfg.cutmix, seed=cfg.seed, epoch=epoch, step=step)
        loss, output = step_fn(images, batch.targets)
        losses.append(loss.detach())
        predicted = output.detach().argmax(dim=1)
        fit_random += (predicted == batch.targets).sum()
        fit_true += (predicted == run.true_labels[batch.indices.to(device)]).sum()
        seen += batch.images.shape[0]
        if step % check_every == 0 or step == steps:
            check_finite(losses, epoch, step)
        bar.update(1)
        if run.stop.requested is not None:
            bar.close()
            batches.close()  # ends the epoch's iteration now (a generator's `finally` stops its backend's work)
            check_finite(losses, epoch, step)  # never checkpoint a diverged model
            write_checkpoint(run, epoch - 1, {
                "epoch": epoch, "step": step, "losses": torch.stack(losses).cpu(), "fit_random": fit_random.cpu(),
                "fit_true": fit_true.cpu(), "seen": seen, "seconds": earlier_seconds + time.perf_counter() - started,
            })
            raise Interrupted(run.stop.requested, epoch, step, str(run.run_dir))
    bar.close()
    batches.close()
    elapsed = earlier_seconds + time.perf_counter() - started
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
    try:
        with distributed_session():  # joins the process group under torchrun
            train(cfg, explicit, resume)
    except Interrupted as stopped:
        print(stopped.message, file=sys.stderr, flush=True)
        return stopped.exit_code
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)


if __name__ == "__main__":
    cli()
