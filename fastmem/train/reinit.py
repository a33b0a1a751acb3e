"""Experiment J: start from a trained model's weights and re-initialize the named parts.

Owns `--init-from` (a run directory or a checkpoint file, loaded with `weights_only=True` through
fastmem/run/checkpoint.py) and `--reinit` (comma-separated part names). Parts are the encoder's blocks
as the model names them (stem, stage1, …), `head` (the whole projector), `head_hidden` (its first
linear layer, when it has one) and `head_out` (its last linear layer). The trainer builds the model
with its seeded fresh initialization first; `init_from_checkpoint` then copies every tensor from the
checkpoint except those of the re-initialized parts, which keep that fresh seeded initialization
(BatchNorm running statistics included). Everything else is bit-identical to the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastmem.errors import fail
from fastmem.models import EncoderProjector, create_model
from fastmem.run.checkpoint import CHECKPOINT_NAME, load_checkpoint


def part_prefixes(model: EncoderProjector) -> dict[str, str]:
    """Every re-initializable part of `model` → the state-dict key prefix of its tensors."""
    parts = {name: f"encoder.blocks.{name}." for name in model.encoder.block_names}
    parts["head"] = "projector."
    if model.projector.hidden is not None:
        parts["head_hidden"] = "projector.hidden."
    parts["head_out"] = "projector.out."
    return parts


def parse_reinit(text: str, model: EncoderProjector) -> tuple[str, ...]:
    """The part names of a `--reinit` value, validated against `model` (one line naming the valid ones)."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    known = part_prefixes(model)
    unknown = [name for name in names if name not in known]
    if unknown:
        fail(f"--reinit: unknown part(s) {', '.join(unknown)}; this model has {', '.join(known)}")
    return names


def check_init_knobs(init_from: str, reinit: str, model_name: str, width: float, bottleneck_dim: int,
                     checkpoint_must_exist: bool = True) -> None:
    """Reject bad --init-from / --reinit values before any work (the model is built on the meta device).
    A sweep checks a run whose source is still to be trained with `checkpoint_must_exist=False`."""
    if reinit and not init_from:
        fail("--reinit needs --init-from (without it every part is freshly initialized anyway)")
    if not init_from:
        return
    if checkpoint_must_exist:
        init_checkpoint_path(init_from)
    with torch.device("meta"):
        model = create_model(model_name, num_classes=2, in_channels=1, image_size=8, width=width,
                             bottleneck_dim=bottleneck_dim)
    parse_reinit(reinit, model)


def init_checkpoint_path(init_from: str) -> Path:
    """The checkpoint file named by `--init-from` (a checkpoint file, or a run directory holding one)."""
    path = Path(init_from).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        fail(f"--init-from {init_from}: no checkpoint there (give a run directory or a {CHECKPOINT_NAME} file)")
    return path


def init_from_checkpoint(model: EncoderProjector, init_from: str, reinit: str = "") -> tuple[str, ...]:
    """Load `init_from`'s weights into `model`, except the `reinit` parts (they keep the model's current values).

    Call it on a freshly, seededly initialized model. Returns the re-initialized part names.
    """
    names = parse_reinit(reinit, model)
    path = init_checkpoint_path(init_from)
    saved = load_checkpoint(path)["model"]
    prefixes = tuple(part_prefixes(model)[name] for name in names)
    own = model.state_dict()
    mismatched = sorted(set(saved) ^ set(own))
    if mismatched:
        fail(f"{path}: its weights do not fit this model (e.g. {mismatched[0]!r} is in only one of them)")
    kept = {key: value for key, value in saved.items() if not key.startswith(prefixes)}
    for key, value in kept.items():
        if tuple(value.shape) != tuple(own[key].shape):
            fail(f"{path}: its weights do not fit this model ({key} is {tuple(value.shape)}, "
                 f"the model's is {tuple(own[key].shape)})")
    missing, unexpected = model.load_state_dict(kept, strict=False)
    assert not unexpected and all(key.startswith(prefixes) for key in missing)
    return names
