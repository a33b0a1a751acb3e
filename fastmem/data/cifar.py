"""CIFAR-10 and CIFAR-100 from the standard python-pickle batches (directory or original .tar.gz).

Owns locating the batches (--data-dir, $FASTMEM_DATA), unpickling them safely (a restricted
Unpickler that admits only numpy's array-reconstruction globals, so a pickle can build dicts, lists,
strings and numpy arrays but never call anything else: no code in a file is ever run), validating shapes and labels,
converting CHW planes to NHWC, and a writer that produces the exact standard layout for tests.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fastmem.data.types import ArrayDataset
from fastmem.errors import fail

# kind -> (batch directory, tar name, train members, test member, meta member, labels key, names key)
LAYOUTS: dict[str, tuple[str, str, tuple[str, ...], str, str, str, str]] = {
    "cifar10": (
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": (
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        ("train",),
        "test",
        "meta",
        "fine_labels",
        "fine_label_names",
    ),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
ROW_BYTES = 3 * 32 * 32

_RECONSTRUCT: Callable[..., Any] = np.ndarray.__reduce__(np.zeros(1))[0]



class _NdarrayName:
    """What the name numpy.ndarray resolves to in a CIFAR pickle: an argument of `_reconstruct`, not callable
    (calling numpy.ndarray itself would let a pickle allocate any size it names)."""


def _reconstruct_empty(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's `_reconstruct` as numpy's own pickles call it: an empty plain ndarray that BUILD then fills.

    Anything else (a subclass, a non-empty shape that would allocate before any data is seen) is refused.
    """
    if subtype is not _NdarrayName or not isinstance(shape, tuple) or shape != (0,):
        raise DisallowedGlobal(f"numpy _reconstruct({subtype!r}, {shape!r})")
    return _RECONSTRUCT(np.ndarray, (0,), dtype)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_empty,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_empty,
    ("numpy", "ndarray"): _NdarrayName,
    ("numpy", "dtype"): np.dtype,
}


class DisallowedGlobal(pickle.UnpicklingError):
    """A pickle referred to a global outside the numpy-array allow-list."""


class _NumpyOnlyUnpickler(pickle._Unpickler):  # type: ignore[name-defined]  # the Python one: BUILD is overridable
    """Unpickler that resolves only numpy's ndarray reconstruction globals, nothing else.

    A dtype's BUILD state must be the one numpy itself pickles for that dtype: a damaged state makes a
    dtype numpy cannot use (internal errors long after loading).
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DisallowedGlobal(f"{module}.{name}") from None

    def load_build(self) -> None:
        state, target = self.stack[-1], self.stack[-2]
        if isinstance(target, np.dtype) and state != target.__reduce__()[2]:
            raise pickle.UnpicklingError(f"dtype {target} with a state numpy does not write: {state!r}"[:120])
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = load_build


def safe_unpickle(blob: bytes, source: str) -> Any:
    """Unpickle CIFAR batch bytes with only numpy array globals allowed; errors name `source`."""
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except DisallowedGlobal as err:
        fail(f"{source}: pickle refers to disallowed global {err} (only numpy arrays are allowed); not loading it")
    except Exception as err:  # noqa: BLE001 - any decoding failure means a corrupt or truncated file
        fail(f"{source}: corrupt or truncated pickle ({type(err).__name__}: {_one_line(err)})")


def _get(batch: Any, key: str, source: str) -> Any:
    """batch[key] whether keys were pickled as str or bytes."""
    if not isinstance(batch, dict):
        fail(f"{source}: expected a dict in the pickle, found {type(batch).__name__}")
    for candidate in (key, key.encode("latin1")):
        if candidate in batch:
            return batch[candidate]
    fail(f"{source}: missing key {key!r} in CIFAR pickle")


def _as_str(value: Any) -> str:
    """A label name as str, whatever encoding the pickle used."""
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _one_line(err: BaseException) -> str:
    """An exception's text on one line."""
    return " ".join(str(err).split()) or type(err).__name__


def _member_label(path: Path, inner_dir: str, member: str) -> str:
    """How a batch file is named in messages: the file itself, or archive:inner/member."""
    return f"{path}:{inner_dir}/{member}" if path.is_file() else str(path / member)


def _read_members(path: Path, inner_dir: str, members: list[str]) -> dict[str, bytes]:
    """The bytes of each member, from a batch directory or in one streaming pass over the archive."""
    if not path.is_file():
        blobs: dict[str, bytes] = {}
        for member in members:
            target = path / member
            if not target.is_file():
                fail(f"{target}: missing CIFAR file")
            try:
                blobs[member] = target.read_bytes()
            except OSError as err:
                fail(f"{target}: cannot read CIFAR file ({err.strerror or err})")
        return blobs
    wanted = {f"{inner_dir}/{m}": m for m in members}
    blobs = {}
    try:
        with tarfile.open(path, "r|*") as tar:  # sequential: one decompression pass, no seeking
            for info in tar:
                member = wanted.get(info.name.lstrip("./"))
                if member is not None and info.isfile():
                    handle = tar.extractfile(info)
                    blobs[member] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        fail(f"{path}: corrupt or truncated CIFAR archive ({_one_line(err)})")
    for member in members:
        if member not in blobs:
            fail(f"{_member_label(path, inner_dir, member)}: missing from the CIFAR archive")
    return blobs


def find_cifar(kind: str, data_dir: str | Path | None) -> Path:
    """Locate the batch directory or .tar.gz for 'cifar10'/'cifar100' under data_dir or $FASTMEM_DATA."""
    inner, tar_name, train_members, *_ = LAYOUTS[kind]
    roots = [Path(r) for r in (data_dir, os.environ.get("FASTMEM_DATA")) if r]
    looked: list[str] = []
    for root in roots:
        if root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar")):
            return root
        for base in (root, root / kind):
            for candidate in (base, base / inner):
                looked.append(str(candidate))
                if (candidate / train_members[0]).is_file() or (candidate / LAYOUTS[kind][4]).is_file():
                    return candidate
            looked.append(str(base / tar_name))
            if (base / tar_name).is_file():
                return base / tar_name
    where = f"looked in {', '.join(looked)}" if looked else "neither --data-dir nor $FASTMEM_DATA is set"
    fail(f"{kind}: {inner}/ or {tar_name} not found ({where}); pass --data-dir DIR or set FASTMEM_DATA")


def _batch_arrays(batch: Any, labels_key: str, source: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(NHWC uint8 images, int64 labels) from one unpickled batch, validated."""
    data = _get(batch, "data", source)
    labels_raw = _get(batch, labels_key, source)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_BYTES:
        shape = getattr(data, "shape", type(data).__name__)
        fail(f"{source}: 'data' must be a uint8 N×{ROW_BYTES} array, found {getattr(data, 'dtype', '')} {shape}")
    try:
        labels = np.asarray(labels_raw, dtype=np.int64)
    except (TypeError, ValueError):
        fail(f"{source}: {labels_key!r} is not a list of integers")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        fail(f"{source}: {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(np.argmax((labels < 0) | (labels >= num_classes)))
        fail(f"{source}: label {int(labels[bad])} at index {bad} is out of range for {num_classes} classes")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def load_cifar(kind: str, split: str = "train", data_dir: str | Path | None = None) -> ArrayDataset:
    """Load CIFAR-10 ('cifar10') or CIFAR-100 ('cifar100') 'train'/'test' as uint8 NHWC 32×32×3."""
    if kind not in LAYOUTS:
        fail(f"unknown CIFAR kind {kind!r} (expected one of {', '.join(LAYOUTS)})")
    if split not in ("train", "test"):
        fail(f"{kind}: unknown split {split!r} (expected 'train' or 'test')")
    inner, _, train_members, test_member, meta_member, labels_key, names_key = LAYOUTS[kind]
    path = find_cifar(kind, data_dir)
    batches = list(train_members if split == "train" else (test_member,))
    blobs = _read_members(path, inner, [meta_member, *batches])
    meta_label = _member_label(path, inner, meta_member)
    names = tuple(_as_str(n) for n in _get(safe_unpickle(blobs.pop(meta_member), meta_label), names_key, meta_label))
    if len(names) != NUM_CLASSES[kind]:
        fail(f"{meta_label}: {len(names)} class names, expected {NUM_CLASSES[kind]}")
    parts = []
    for member in batches:
        label = _member_label(path, inner, member)
        parts.append(_batch_arrays(safe_unpickle(blobs.pop(member), label), labels_key, label, len(names)))
    images = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
    labels = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])
    return ArrayDataset(images, labels, names, f"{kind}:{split}")


class _Py2StylePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Protocol-2 pickler that writes str/bytes as py2 BINSTRINGs, like the original CIFAR files."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _save_binstring(self, obj: bytes | str) -> None:
        """Write a py2 str opcode (SHORT_BINSTRING/BINSTRING) holding the latin-1 bytes."""
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    def save_global(self, obj: Any, name: str | None = None) -> None:
        """Write numpy's _reconstruct under its historical module name; everything else as usual."""
        if obj is _RECONSTRUCT:  # the module name numpy 1.x (and the real CIFAR files) use
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        pickle._Pickler.save_global(self, obj, name)  # type: ignore[attr-defined]

    dispatch[bytes] = _save_binstring
    dispatch[str] = _save_binstring


def _py2_pickle(obj: Any) -> bytes:
    """Pickle `obj` in the protocol-2, py2-string form of the original CIFAR batches."""
    buffer = io.BytesIO()
    _Py2StylePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _to_rows(images: np.ndarray) -> np.ndarray:
    """NHWC 32×32×3 uint8 → N×3072 rows of R, G, B planes."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3):
        raise ValueError(f"CIFAR images must be uint8 N×32×32×3, got {images.dtype} {images.shape}")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), ROW_BYTES))


def write_cifar(
    root: str | Path,
    kind: str = "cifar10",
    train: tuple[np.ndarray, np.ndarray] | None = None,
    test: tuple[np.ndarray, np.ndarray] | None = None,
    class_names: tuple[str, ...] | list[str] | None = None,
    as_tar: bool = False,
) -> Path:
    """Write CIFAR batches in the standard layout under root; return the batch dir or the .tar.gz."""
    inner, tar_name, train_members, test_member, meta_member, labels_key, names_key = LAYOUTS[kind]
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(NUM_CLASSES[kind])]
    empty = (np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64))
    members: dict[str, bytes] = {}
    for split, (images, labels), split_members in (
        ("train", train or empty, train_members),
        ("test", test or empty, (test_member,)),
    ):
        rows, labels = _to_rows(images), np.asarray(labels, dtype=np.int64)
        for index, chunk in enumerate(np.array_split(np.arange(len(rows)), len(split_members))):
            batch: dict[Any, Any] = {
                b"batch_label": f"{split} batch {index + 1} of {len(split_members)}".encode(),
                b"data": rows[chunk],
                labels_key.encode(): [int(v) for v in labels[chunk]],
                b"filenames": [f"img_{i:06d}.png".encode() for i in chunk],
            }
            if kind == "cifar100":  # synthetic superclasses: 20 groups of consecutive fine labels
                batch[b"coarse_labels"] = [int(v) * 20 // len(names) for v in labels[chunk]]
            members[split_members[index]] = _py2_pickle(batch)
    meta: dict[Any, Any] = {names_key.encode(): [n.encode() for n in names]}
    if kind == "cifar10":
        meta[b"num_cases_per_batch"] = 10000
        meta[b"num_vis"] = ROW_BYTES
    else:
        meta[b"coarse_label_names"] = [f"superclass_{i}".encode() for i in range(20)]
    members[meta_member] = _py2_pickle(meta)

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if not as_tar:
        target = root / inner
        target.mkdir(exist_ok=True)
        for member, blob in members.items():
            (target / member).write_bytes(blob)
        return target
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=root)
    with os.fdopen(fd, "wb") as handle, tarfile.open(fileobj=handle, mode="w:gz") as tar:
        for member, blob in members.items():
            info = tarfile.TarInfo(f"{inner}/{member}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    os.replace(tmp, root / tar_name)
    return root / tar_name
