"""Per-query k-NN predictions of every probe, kept beside a run so that its reports can give intervals.

RUN_DIR/probe_predictions/epoch_EEEEEE.npz (written atomically by the trainer after each probe):
`layers` (probe-point names), `predictions` (layers × queries, the predicted class) and `truth` (the
queries' true labels). Accuracies with their Wilson intervals, and paired differences between two
probes over the same queries (fastmem.run.stats.paired_difference), are computed from these.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from fastmem.data.npz import read_npz
from fastmem.errors import fail
from fastmem.io_utils import atomic_path

PREDICTIONS_DIR = "probe_predictions"
_ARRAYS = {"layers": "U", "predictions": "i", "truth": "i"}


def predictions_path(run_dir: str | Path, epoch: int) -> Path:
    return Path(run_dir) / PREDICTIONS_DIR / f"epoch_{epoch:06d}.npz"


def write_predictions(run_dir: str | Path, epoch: int, predictions: OrderedDict[str, np.ndarray],
                      truth: np.ndarray) -> Path:
    """Save one probe's predictions (layer → class per query) and the queries' true labels."""
    return write_predictions_file(predictions_path(run_dir, epoch), predictions, truth)


def write_predictions_file(path: Path, predictions: OrderedDict[str, np.ndarray], truth: np.ndarray) -> Path:
    """`write_predictions` to a named file (e.g. a baseline probe's, probe_predictions/untrained_bn_calibrated.npz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = np.stack([np.asarray(p) for p in predictions.values()]) if predictions else np.zeros((0, len(truth)))
    largest = max(int(table.max(initial=0)), int(np.max(truth, initial=0)))
    dtype = np.int8 if largest < 2**7 else np.int16 if largest < 2**15 else np.int32
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:  # compressed: a class index per query compresses about 3×
            np.savez_compressed(handle, layers=np.array(list(predictions), dtype=str), predictions=table.astype(dtype),
                     truth=np.asarray(truth).astype(dtype))
    return path


def read_predictions(path: str | Path) -> tuple[OrderedDict[str, np.ndarray], np.ndarray]:
    """(layer → predicted class per query, true labels); a damaged or foreign file is one line naming it."""
    arrays = read_npz(path, _ARRAYS, "probe predictions file")
    layers, table, truth = arrays["layers"], arrays["predictions"], arrays["truth"]
    if layers.ndim != 1 or truth.ndim != 1 or table.shape != (layers.size, truth.size):
        fail(f"{path}: arrays of inconsistent shapes (layers {layers.shape}, predictions {table.shape}, "
             f"truth {truth.shape}); not a probe predictions file")
    return OrderedDict((str(name), table[i].astype(np.int64)) for i, name in enumerate(layers)), truth.astype(np.int64)


def probe_epochs(run_dir: str | Path) -> list[int]:
    """The epochs whose predictions RUN_DIR keeps, in order."""
    folder = Path(run_dir) / PREDICTIONS_DIR
    epochs = []
    for path in folder.glob("epoch_*.npz") if folder.is_dir() else []:
        digits = path.stem.removeprefix("epoch_")
        if digits.isdigit():
            epochs.append(int(digits))
    return sorted(epochs)
