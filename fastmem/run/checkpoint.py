"""Checkpoints: written atomically, loaded with `weights_only=True` (no pickled code from files).

A checkpoint holds the model, optimizer and grad-scaler states, the completed epoch, and the RNG
states of torch, numpy and Python, so a resumed run continues exactly where it stopped. One written
on a stop signal mid-epoch also holds `in_progress`: {"epoch": the epoch under way, "step": the steps
done in it, "losses" (float tensor of their losses), "fit_random", "fit_true" (int64 hit counts), "seen"
(images), "seconds"}; its `epoch` stays the last completed one, so readers that ignore `in_progress` see
a consistent (if slightly newer) model. A write interrupted by a second signal leaves the previous file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmem.errors import fail
from fastmem.io_utils import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"
ZIP_MAGIC = b"PK\x03\x04"


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
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(payload, handle)  # through a Python file, so a full disk surfaces as the OSError it is


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (`weights_only=True`); a corrupt or foreign file is a user error.

    Checks what every reader needs: a `model` dict of named tensors and a completed `epoch` >= 0. A resume
    also needs `check_resumable`; `checkpoint_config` gives the config the run that wrote it had.
    """
    path = Path(path)
    if not path.is_file():
        fail(f"{path}: checkpoint not found")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as err:
        fail(f"{path}: cannot read the checkpoint ({err.strerror or err})")
    if magic != ZIP_MAGIC:  # torch.save's format since torch 1.6 (what save_checkpoint writes) is a zip archive
        what = "an empty file" if not magic else "no zip archive: truncated at the start, garbage or another format"
        fail(f"{path}: not a loadable fastmem checkpoint ({what})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt or unsafe files
        why = _one_line(err)
        if "Weights only load failed" in why:
            why = "it pickles objects other than tensors and plain data; nothing in it was run"
        fail(f"{path}: not a loadable fastmem checkpoint ({why})")
    if not isinstance(payload, dict) or "model" not in payload or "epoch" not in payload:
        fail(f"{path}: not a fastmem checkpoint (missing model/epoch)")
    model = payload["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in model.items()):
        fail(f"{path}: not a fastmem checkpoint ('model' is not a dict of named tensors)")
    if not _is_int(payload["epoch"]) or payload["epoch"] < 0:
        fail(f"{path}: not a fastmem checkpoint ('epoch' is {payload['epoch']!r}, not a count of epochs)")
    return payload


RESUME_KEYS: tuple[str, ...] = ("model", "optimizer", "scaler", "epoch", "rng")
_IN_PROGRESS_TYPES: dict[str, str] = {"epoch": "int", "step": "int", "losses": "tensor", "fit_random": "tensor",
                                      "fit_true": "tensor", "seen": "int", "seconds": "number"}


def check_resumable(payload: dict[str, Any], path: str | Path) -> None:
    """Fail with one line naming what is missing or malformed if a run cannot resume from this checkpoint."""
    missing = [key for key in RESUME_KEYS if key not in payload]
    if missing:
        fail(f"{path}: checkpoint lacks {', '.join(missing)}; a run cannot resume from it")
    optimizer = payload["optimizer"]
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) \
            or not isinstance(optimizer.get("param_groups"), list):
        fail(f"{path}: checkpoint's 'optimizer' is not an optimizer state (state, param_groups)")
    if not isinstance(payload["scaler"], dict):
        fail(f"{path}: checkpoint's 'scaler' is not a grad-scaler state")
    _check_rng(payload["rng"], path, "rng")
    in_progress = payload.get("in_progress")
    if in_progress is not None:
        if not isinstance(in_progress, dict):
            fail(f"{path}: checkpoint's 'in_progress' is not a dict")
        for key, kind in _IN_PROGRESS_TYPES.items():
            value = in_progress.get(key)
            ok = {"int": _is_int(value), "tensor": torch.is_tensor(value),
                  "number": _is_int(value) or isinstance(value, float)}[kind]
            if not ok:
                fail(f"{path}: checkpoint's in_progress[{key!r}] is {type(value).__name__}, expected {kind}")


def _check_rng(state: Any, path: str | Path, where: str) -> None:
    """The shape of `capture_rng_state`'s result; errors name `where` in the checkpoint."""
    if not isinstance(state, dict) or not all(key in state for key in ("torch", "numpy_keys", "numpy_meta", "python")):
        fail(f"{path}: checkpoint's '{where}' lacks torch/numpy/python RNG states")
    if not torch.is_tensor(state["torch"]) or state["torch"].dtype != torch.uint8 \
            or state["torch"].shape != torch.get_rng_state().shape:
        fail(f"{path}: checkpoint's {where}['torch'] is not a torch CPU RNG state")
    if not torch.is_tensor(state["numpy_keys"]) or tuple(state["numpy_keys"].shape) != (624,):
        fail(f"{path}: checkpoint's {where}['numpy_keys'] is not a numpy MT19937 key (624 words)")
    meta, python = state["numpy_meta"], state["python"]
    if not isinstance(meta, list) or len(meta) != 4 or meta[0] != "MT19937":
        fail(f"{path}: checkpoint's {where}['numpy_meta'] is not numpy's RNG metadata")
    if not isinstance(python, list) or len(python) != 3 or not isinstance(python[1], list) or len(python[1]) != 625 \
            or not all(_is_int(word) for word in python[1]):
        fail(f"{path}: checkpoint's {where}['python'] is not a Python random state")


def checkpoint_config(payload: dict[str, Any], path: str | Path) -> dict[str, Any] | None:
    """The config (as a dict) of the run that wrote the checkpoint; None for checkpoints that predate it."""
    text = payload.get("config")
    if text is None:
        return None
    try:
        values = json.loads(text) if isinstance(text, str) else None
    except (json.JSONDecodeError, RecursionError):
        values = None
    if not isinstance(values, dict):
        fail(f"{path}: checkpoint's 'config' is not a JSON object")
    return values


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _one_line(err: BaseException) -> str:
    """The first line of an exception's text (its type when it has none): torch's can run to paragraphs."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    first = lines[0].split(". ")[0] if lines else type(err).__name__
    return first if len(first) <= 160 else first[:157] + "..."


def restore_training_state(payload: dict[str, Any], path: str | Path, model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> int:
    """Load a resumable checkpoint's model, optimizer, scaler and RNG states; its completed epoch.

    Tensors of other names or shapes than this run's model and optimizer are one line naming the first
    such tensor (torch would raise later, mid-epoch, or not at all for optimizer moments).
    """
    check_resumable(payload, path)
    expected = model.state_dict()
    saved = payload["model"]
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        what = "; ".join(part for part in (f"missing {', '.join(missing[:3])}" if missing else "",
                                           f"unexpected {', '.join(unexpected[:3])}" if unexpected else "") if part)
        fail(f"{path}: model tensors differ from this run's model ({what}{', …' if len(missing) + len(unexpected) > 3 else ''})")
    for name, tensor in saved.items():
        if tensor.shape != expected[name].shape:
            fail(f"{path}: model tensor {name} has shape {tuple(tensor.shape)}, this run's model {tuple(expected[name].shape)}")
    _check_optimizer_state(payload["optimizer"], optimizer, model, path)
    model.load_state_dict(saved)
    try:
        optimizer.load_state_dict(payload["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as err:
        fail(f"{path}: checkpoint's optimizer state does not fit this run's optimizer ({_one_line(err)})")
    try:
        scaler.load_state_dict(payload["scaler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        fail(f"{path}: checkpoint's grad-scaler state does not fit ({_one_line(err)})")
    try:
        restore_rng_state(payload["rng"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as err:
        fail(f"{path}: checkpoint's RNG states cannot be restored ({_one_line(err)})")
    return int(payload["epoch"])


def _check_optimizer_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                           path: str | Path) -> None:
    """Saved parameter groups of this optimizer's sizes, and per-parameter moments of their parameters' shapes."""
    groups, ours = saved["param_groups"], optimizer.param_groups
    if len(groups) != len(ours) or any(not isinstance(g, dict) or not isinstance(g.get("params"), list)
                                       or len(g["params"]) != len(o["params"]) for g, o in zip(groups, ours)):
        fail(f"{path}: checkpoint's optimizer has other parameter groups than this run's model")
    names = {id(p): name for name, p in model.named_parameters()}
    params = {pid: p for g, o in zip(groups, ours) for pid, p in zip(g["params"], o["params"])}
    for pid, entry in saved["state"].items():
        param = params.get(pid)
        if param is None or not isinstance(entry, dict):
            fail(f"{path}: checkpoint's optimizer state refers to parameter {pid!r}, which this run's model lacks")
        for key, value in entry.items():
            if torch.is_tensor(value) and value.ndim > 0 and value.shape != param.shape:
                fail(f"{path}: optimizer {key} of {names.get(id(param), pid)} has shape {tuple(value.shape)}, "
                     f"the parameter {tuple(param.shape)}")
