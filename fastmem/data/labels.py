"""Training targets per PROTOCOL.md: uniform random labels or partial noise, drawn once per run.

A fraction `label_noise` of the samples (exactly round(p·N), chosen by the seeded RNG) get a
uniform random class (not a permutation, so ~1/C of them agree with the truth by chance); the rest
keep their true label. Saved beside the run as labels.npz so probes and reports can recover them.
"""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastmem.errors import fail
from fastmem.io_utils import atomic_path


@dataclass(frozen=True)
class RunLabels:
    """True labels, the training targets, and which samples were redrawn."""

    true_labels: np.ndarray
    targets: np.ndarray
    corrupted: np.ndarray
    num_classes: int
    label_noise: float
    label_seed: int


def make_targets(true_labels: np.ndarray, num_classes: int, label_noise: float, label_seed: int) -> RunLabels:
    """Redraw a fraction `label_noise` of the labels uniformly at random, seeded by `label_seed`."""
    if not 0.0 <= label_noise <= 1.0:
        fail(f"--label-noise must be in [0, 1], got {label_noise}")
    true_labels = np.asarray(true_labels, dtype=np.int64)
    n = true_labels.shape[0]
    rng = np.random.default_rng(label_seed)
    corrupted = np.zeros(n, dtype=bool)
    corrupted[rng.permutation(n)[: int(round(label_noise * n))]] = True
    targets = true_labels.copy()
    targets[corrupted] = rng.integers(0, num_classes, size=int(corrupted.sum()))
    return RunLabels(true_labels, targets, corrupted, num_classes, float(label_noise), int(label_seed))


def save_labels(path: str | Path, labels: RunLabels) -> None:
    """Write labels.npz atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                true_labels=labels.true_labels,
                targets=labels.targets,
                corrupted=labels.corrupted,
                num_classes=np.int64(labels.num_classes),
                label_noise=np.float64(labels.label_noise),
                label_seed=np.int64(labels.label_seed),
            )


LABEL_ARRAYS: dict[str, str] = {"true_labels": "i", "targets": "i", "corrupted": "b", "num_classes": "i",
                                "label_noise": "f", "label_seed": "i"}


def load_labels(path: str | Path) -> RunLabels:
    """Read labels.npz written by `save_labels`; a truncated, garbage or foreign file is one line naming it.

    The archive is parsed here, not by np.load: no pickled objects, and every array's header is checked
    against the bytes it has before anything is allocated (a damaged header cannot ask for gigabytes).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        fail(f"{path}: cannot read labels ({err.strerror or err})")
    if not raw:
        fail(f"{path}: empty file; not a labels file")
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            arrays = {name: _read_member(archive, name, len(raw)) for name in LABEL_ARRAYS}
    except _BadLabels as err:
        fail(f"{path}: {err}; not a readable labels file")
    except Exception as err:  # noqa: BLE001 - zipfile/zlib raise many types for damaged archives
        fail(f"{path}: not a readable labels file ({type(err).__name__}: {' '.join(str(err).split())[:120]})")
    true_labels, targets, corrupted = arrays["true_labels"], arrays["targets"], arrays["corrupted"]
    scalars = [arrays[name] for name in ("num_classes", "label_noise", "label_seed")]
    if true_labels.ndim != 1 or targets.shape != true_labels.shape or corrupted.shape != true_labels.shape \
            or any(a.shape != () for a in scalars):
        fail(f"{path}: arrays of inconsistent shapes (true_labels {true_labels.shape}, targets {targets.shape}, "
             f"corrupted {corrupted.shape}); not a labels file")
    num_classes, label_noise = int(arrays["num_classes"]), float(arrays["label_noise"])
    for name, values in (("true_labels", true_labels), ("targets", targets)):
        if values.size and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            fail(f"{path}: {name} outside 0..{num_classes - 1}; not a labels file")
    if num_classes < 1 or not 0.0 <= label_noise <= 1.0:
        fail(f"{path}: num_classes {num_classes} / label_noise {label_noise} out of range; not a labels file")
    return RunLabels(true_labels.astype(np.int64), targets.astype(np.int64), corrupted, num_classes, label_noise,
                     int(arrays["label_seed"]))


class _BadLabels(Exception):
    """What is wrong with one member of a labels archive (turned into a FastmemError naming the file)."""


def _read_member(archive: zipfile.ZipFile, name: str, archive_size: int) -> np.ndarray:
    """One `name.npy` member: a plain (non-object) array of the expected kind, its size checked first."""
    try:
        info = archive.getinfo(name + ".npy")
    except KeyError:
        raise _BadLabels(f"no {name!r} array") from None
    if info.file_size > 64 * archive_size + (1 << 20):
        raise _BadLabels(f"{name!r} claims {info.file_size} bytes")
    blob = archive.read(info)
    stream = io.BytesIO(blob)
    try:
        major, _ = np.lib.format.read_magic(stream)
        if major not in (1, 2):
            raise ValueError(f".npy format version {major}")
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
    except (ValueError, OSError, SyntaxError) as err:
        raise _BadLabels(f"{name!r} has no valid .npy header ({' '.join(str(err).split())[:80]})") from None
    if dtype.hasobject or dtype.kind != LABEL_ARRAYS[name] and not (LABEL_ARRAYS[name] == "i" and dtype.kind == "u"):
        raise _BadLabels(f"{name!r} has dtype {dtype}, expected {_KIND_NAMES[LABEL_ARRAYS[name]]}")
    count = math.prod(shape)
    if count < 0 or count * dtype.itemsize != len(blob) - stream.tell():
        raise _BadLabels(f"{name!r} is truncated or padded ({len(blob) - stream.tell()} data bytes for shape {shape})")
    array = np.frombuffer(blob, dtype=dtype, count=count, offset=stream.tell())
    return array.reshape(shape, order="F" if fortran else "C").copy()


_KIND_NAMES = {"i": "integers", "b": "booleans", "f": "a float"}
