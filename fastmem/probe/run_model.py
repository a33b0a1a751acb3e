"""A run's network as the probe CLI loads it: the config's model, its seed's initialisation or a checkpoint, the layers."""

from __future__ import annotations

from pathlib import Path

import torch

from fastmem.data import ArrayDataset
from fastmem.errors import fail
from fastmem.models import EncoderProjector, create_model
from fastmem.run.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fastmem.run.config import TrainConfig


def load_run_model(run_dir: Path, cfg: TrainConfig, data: ArrayDataset, device: torch.device, *,
                   checkpoint: str | None, untrained: bool, layers: str) -> tuple[EncoderProjector, int, tuple[str, ...]]:
    """(the model on `device`, channels_last; the checkpoint's epoch, 0 untrained; the probe points asked for, or all).

    `data` gives the image shape and class count; `checkpoint` defaults to RUN_DIR/checkpoint.pt; `untrained`
    rebuilds the run's initialisation from its seed. An unknown probe point or a checkpoint of another model is
    a one-line error.
    """
    torch.manual_seed(cfg.seed)
    height, _, channels = data.image_shape
    model = create_model(cfg.model, num_classes=data.num_classes, in_channels=channels, image_size=height,
                         width=cfg.width, bottleneck_dim=cfg.bottleneck_dim)
    epoch = 0
    if not untrained:
        state = load_checkpoint(checkpoint or run_dir / CHECKPOINT_NAME)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:
            fail(f"{checkpoint or run_dir / CHECKPOINT_NAME}: does not fit the run's model ({str(err).splitlines()[0]})")
        epoch = int(state["epoch"])
    model = model.to(device).to(memory_format=torch.channels_last)
    wanted = tuple(name for name in layers.split(",") if name) or model.probe_points
    unknown = [name for name in wanted if name not in model.probe_points]
    if unknown:
        fail(f"unknown probe point(s) {', '.join(unknown)}; this model has {', '.join(model.probe_points)}")
    return model, epoch, wanted
