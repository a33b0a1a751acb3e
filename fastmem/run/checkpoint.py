"""Checkpoints: written atomically, loaded with `weights_only=True` (no pickled code from files).

A checkpoint holds the model, optimizer and grad-scaler states, the completed epoch, and the RNG
states of torch, numpy and Python, so a resumed run continues exactly where it stopped. One written
on a stop signal mid-epoch also holds `in_progress`: {"epoch": the epoch under way, "step": the steps
done in it, "losses" (float tensor of their losses), "fit_random", "fit_true" (int64 hit counts), "seen"
(images), "seconds"}; its `epoch` stays the last completed one, so readers that ignore `in_progress` see
a consistent (if slightly newer) model. A write interrupted by a second signal leaves the previous file.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmem.errors import fail
from fastmem.io_utils import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"


def capture_rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), numpy's global RNG and Python's `random`, as tensors and ints."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_meta": [np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)],
        "python": [py_version, list(py_state), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, pos, has_gauss, gauss = state["numpy_meta"]
    np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` (tensors, numbers, strings, lists, dicts) atomically with torch.save."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (`weights_only=True`); a corrupt or foreign file is a user error."""
    path = Path(path)
    if not path.is_file():
        fail(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or unsafe files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fail(f"{path}: not a loadable fastmem checkpoint ({first_line})")
    if not isinstance(payload, dict) or "model" not in payload or "epoch" not in payload:
        fail(f"{path}: not a fastmem checkpoint (missing model/epoch)")
    return payload
