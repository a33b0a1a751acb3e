"""The second untrained baseline: the run's untrained network with BatchNorm statistics re-estimated on its data.

The epoch-0 probe of a run sees BatchNorm's *initial* running statistics (mean 0, variance 1: BN is nearly the
identity), while every trained network is probed with statistics accumulated over training. Both are legitimate
baselines: "untrained, initial BN" is the network as initialised; "untrained, BN calibrated" is the same weights with
each BatchNorm's running mean and variance re-estimated on the training images, so that a lift measures what
training changed in the weights, not what it changed in the statistics.

Protocol (`calibrate_batchnorm`): every BatchNorm's running statistics are reset and re-estimated as cumulative
averages (momentum None) over CALIBRATION_BATCHES batches of CALIBRATION_BATCH_SIZE clean training images (no
augmentation; scaled to [0, 1] as the probe scales them), taken in a permutation of the training images seeded by
(the run's data seed, CALIBRATION_SALT), cycled when the batches ask for more images than there are; forward in
train mode without gradients, in the run's precision. No weight changes (tested bit for bit).

`probe_calibrated_baseline(run_dir)` rebuilds the run's untrained network (the trainer's seeded initialisation),
calibrates it and probes it exactly as the trainer probes (same references, queries, k, vote, precision), writing
RUN_DIR/probe_predictions/untrained_bn_calibrated.npz (fastmem/run/predictions.py's format) and
RUN_DIR/baselines.json (accuracy per probe point and the protocol).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmem.data.splits import select_run_data
from fastmem.errors import fail
from fastmem.io_utils import write_json_atomic
from fastmem.models import EncoderProjector, create_model
from fastmem.run.config import TrainConfig, load_resolved, load_run_config
from fastmem.run.predictions import PREDICTIONS_DIR, write_predictions_file
from fastmem.runtime import autocast, precision_dtype

from . import ProbeResult, probe_predictions

CALIBRATION_BATCHES = 8
CALIBRATION_BATCH_SIZE = 256
CALIBRATION_SALT = 0xBA7C
BASELINES_FILE = "baselines.json"
CALIBRATED_NAME = "untrained_bn_calibrated"


def calibrate_batchnorm(model: torch.nn.Module, images: np.ndarray, *, seed: int, device: torch.device,
                        dtype: torch.dtype | None = None, batches: int = CALIBRATION_BATCHES,
                        batch_size: int = CALIBRATION_BATCH_SIZE, channels_last: bool = True) -> int:
    """Re-estimate every BatchNorm's running statistics of `model` on uint8 NHWC `images` (the protocol above).

    Returns the number of BatchNorm layers calibrated; the model is left in eval mode, its weights untouched.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or len(images) == 0:
        model.eval()
        return 0
    saved_momentum = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batches
    order = np.random.default_rng([seed, CALIBRATION_SALT]).permutation(len(images))
    draws = np.resize(order, batches * batch_size)  # cycled when the batches want more than there are
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.train()
    try:
        with torch.no_grad():
            for start in range(0, len(draws), batch_size):
                batch = torch.from_numpy(images[draws[start:start + batch_size]]).to(device)
                batch = batch.permute(0, 3, 1, 2).float().div_(255).contiguous(memory_format=memory_format)
                with autocast(device, dtype):
                    model(batch)
    finally:
        for norm, momentum in zip(norms, saved_momentum):
            norm.momentum = momentum
        model.eval()
    return len(norms)


def untrained_model(cfg: TrainConfig, num_classes: int, image_shape: tuple[int, ...],
                    device: torch.device) -> EncoderProjector:
    """The run's network before its first step: the trainer's seeded initialisation (fastmem/train/build.py)."""
    torch.manual_seed(cfg.seed)
    height, _, channels = image_shape
    model = create_model(cfg.model, num_classes=num_classes, in_channels=channels, image_size=height,
                         width=cfg.width, bottleneck_dim=cfg.bottleneck_dim).to(device)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def probe_untrained(run_dir: str | Path, *, calibrate: bool, device: torch.device | None = None) -> ProbeResult:
    """The k-NN predictions of the run's untrained network, with initial or calibrated BN, as the trainer probes."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if cfg.init_from:
        fail(f"{run_dir}: starts from another run's weights (--init-from); its untrained network is that run's")
    device = device or torch.device("cpu")
    resolved = load_resolved(run_dir)
    dtype = precision_dtype(resolved.get("precision", "fp32")) if resolved.get("device") == device.type else None
    train, test = select_run_data(cfg.dataset, cfg.data_dir, subset=cfg.subset, probe_subset=cfg.probe_subset,
                                  image_size=cfg.image_size, seed=cfg.data_seed, probe_reference=cfg.probe_reference)
    training = train if not cfg.probe_reference else select_run_data(  # the reference is the training images
        cfg.dataset, cfg.data_dir, subset=cfg.subset, probe_subset=cfg.probe_subset, image_size=cfg.image_size,
        seed=cfg.data_seed, probe_reference=0)[0]
    model = untrained_model(cfg, train.num_classes, train.image_shape, device)
    if calibrate:
        calibrate_batchnorm(model, training.images, seed=cfg.data_seed, device=device, dtype=dtype,
                            channels_last=cfg.channels_last)
    model.eval()
    return probe_predictions(model, train.images, train.labels, test.images, test.labels, device=device, dtype=dtype,
                             k=cfg.probe_k, vote=cfg.probe_vote, temperature=cfg.probe_temperature,
                             num_classes=train.num_classes, project_dim=cfg.probe_project_dim)


def probe_calibrated_baseline(run_dir: str | Path, device: torch.device | None = None) -> dict[str, Any]:
    """Probe the run's BN-calibrated untrained network; keep its predictions and baselines.json. Returns the record."""
    run_dir = Path(run_dir)
    result = probe_untrained(run_dir, calibrate=True, device=device)
    write_predictions_file(run_dir / PREDICTIONS_DIR / f"{CALIBRATED_NAME}.npz", result.predictions, result.truth)
    record = {CALIBRATED_NAME: {"accuracy": dict(result.accuracy()), "queries": int(result.truth.size),
                                "protocol": {"batches": CALIBRATION_BATCHES, "batch_size": CALIBRATION_BATCH_SIZE,
                                             "seed": "data_seed", "salt": CALIBRATION_SALT,
                                             "images": "the run's training images, clean, [0, 1]"}}}
    write_json_atomic(run_dir / BASELINES_FILE, record, sort_keys=False)
    return record


def read_baselines(run_dir: str | Path) -> dict[str, Any]:
    """RUN_DIR/baselines.json, or {} where the calibrated baseline was not probed."""
    path = Path(run_dir) / BASELINES_FILE
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def calibrated_accuracy(run_dir: str | Path) -> OrderedDict[str, float]:
    entry = read_baselines(run_dir).get(CALIBRATED_NAME, {})
    return OrderedDict(entry.get("accuracy", {}))
