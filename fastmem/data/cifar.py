"""CIFAR-10 and CIFAR-100 from the standard python-pickle batches (directory or original .tar.gz).

Owns locating the batches (--data-dir, $FASTMEM_DATA), unpickling them safely (a restricted
Unpickler that admits only numpy's array-reconstruction globals for plain numeric dtypes and the latin-1
`_codecs.encode` that Python 3 writes bytes with, each through a checked stand-in, so a pickle can build
dicts, lists, strings, bytes and numeric numpy arrays but never call anything else: no code in a file is
ever run), validating shapes and labels, converting CHW planes to NHWC, and a writer that produces the
exact standard layout for tests.
"""

from __future__ import annotations

import io
import math
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
_FROMBUFFER: Callable[..., Any] = np.ndarray.__reduce_ex__(np.zeros(1), 5)[0]  # how protocol 5 rebuilds arrays
_SCALAR: Callable[..., Any] = np.int64(0).__reduce__()[0]
_NUMERIC_KINDS = "biufc"  # bool, int, uint, float, complex: fixed-size values, never object references


class DisallowedGlobal(pickle.UnpicklingError):
    """A pickle referred to a global outside the allow-list, or called an allowed one outside its use."""


class _NdarrayName:
    """What the name numpy.ndarray resolves to in a CIFAR pickle: an argument of `_reconstruct`, not callable
    (calling numpy.ndarray itself would let a pickle allocate any size it names)."""


def _numeric(dtype: Any, what: str) -> np.dtype:
    """`dtype` (a dtype, or the type code numpy's pickles pass) if it is plain numeric; never object/void/str."""
    resolved = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype) if isinstance(dtype, (str, bytes)) else None
    if resolved is None or resolved.kind not in _NUMERIC_KINDS:
        raise DisallowedGlobal(f"{what}({dtype!r})"[:100])
    return resolved


def _reconstruct_empty(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's `_reconstruct` as numpy's own pickles call it: an empty plain ndarray that BUILD then fills.

    Anything else (a subclass, a non-numeric dtype, a non-empty shape that would allocate before any data is seen)
    is refused.
    """
    if subtype is not _NdarrayName or not isinstance(shape, tuple) or shape != (0,):
        raise DisallowedGlobal(f"numpy _reconstruct({getattr(subtype, '__name__', subtype)!r}, {shape!r})"[:100])
    return _RECONSTRUCT(np.ndarray, (0,), _numeric(dtype, "numpy _reconstruct"))


def _plain_dtype(*args: Any) -> np.dtype:
    """numpy.dtype as numpy pickles it, dtype(code, False, True), for plain numeric dtypes only."""
    if len(args) != 3 or not isinstance(args[0], str) or not all(isinstance(a, bool) for a in args[1:]):
        raise DisallowedGlobal(f"numpy.dtype{args!r}"[:100])
    dtype = np.dtype(*args)
    if dtype.kind not in _NUMERIC_KINDS:
        raise DisallowedGlobal(f"numpy.dtype{args!r}"[:100])
    return dtype


def _frombuffer_exact(buf: Any, dtype: Any, shape: Any, order: Any, *axis_order: Any) -> np.ndarray:
    """numpy's protocol-5 `_frombuffer` for an in-band buffer of a plain numeric dtype that exactly fills `shape`."""
    dtype = _numeric(dtype, "numpy _frombuffer")
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape) or len(shape) > 32:
        raise pickle.UnpicklingError(f"numpy _frombuffer shape {shape!r}"[:100])
    fits = isinstance(buf, (bytes, bytearray)) and len(buf) == math.prod(shape) * dtype.itemsize
    if not fits or order not in ("C", "F", "K"):
        raise pickle.UnpicklingError(f"numpy _frombuffer buffer does not fill {dtype} {shape} in order {order!r}"[:100])
    return _FROMBUFFER(buf, dtype, shape, order, *axis_order)


def _numeric_scalar(dtype: Any, data: Any) -> Any:
    """numpy's `scalar(dtype, raw bytes)`, how a numpy number (e.g. an np.int64 label) pickles, numeric dtypes only."""
    dtype = _numeric(dtype, "numpy scalar")
    raw = data.encode("latin1") if isinstance(data, str) else data  # str: a Python 2 pickle read as latin-1
    if not isinstance(raw, bytes) or len(raw) != dtype.itemsize:
        raise pickle.UnpicklingError(f"numpy scalar data does not fit {dtype}")
    return _SCALAR(dtype, raw)


def _latin1_encode(*args: Any) -> bytes:
    """_codecs.encode as Python 3 pickles non-empty bytes at protocols 0-2: encode(str, 'latin1'), nothing else."""
    if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
        raise DisallowedGlobal(f"_codecs.encode(..., {args[1:]!r})"[:100])
    return args[0].encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """bytes as Python 3 pickles b'' at protocols 0-2: bytes() with no argument (bytes(n) would allocate n)."""
    if args:
        raise DisallowedGlobal("builtins.bytes with an argument")
    return b""


# Everything a CIFAR batch written by Python 2 or 3 (protocols 0-5, numpy 1.x `numpy.core` or 2.x `numpy._core`)
# needs: numpy arrays and numbers of plain numeric dtypes, and bytes as protocols 0-2 write them.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _reconstruct_empty for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _frombuffer_exact for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _numeric_scalar for core in ("core", "_core")},
    ("numpy", "ndarray"): _NdarrayName,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,  # the name protocols 0-2 write (fix_imports)
    ("builtins", "bytes"): _empty_bytes,
}


class _NumpyOnlyUnpickler(pickle._Unpickler):  # type: ignore[name-defined]  # the Python one: BUILD is overridable
    """Unpickler that resolves only the globals in _ALLOWED_GLOBALS, each to a checked stand-in, nothing else.

    A dtype's BUILD state must be the one numpy itself pickles for that dtype: a damaged state makes a
    dtype numpy cannot use (internal errors long after loading).
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):  # TypeError: a name pickled as something unhashable
            label = f"{module}.{name}"
            raise DisallowedGlobal((label if label.isprintable() else repr(label))[:100]) from None

    def load_build(self) -> None:
        state, target = self.stack[-1], self.stack[-2]
        if isinstance(target, np.dtype) and state != target.__reduce__()[2]:
            raise pickle.UnpicklingError(f"dtype {target} with a state numpy does not write: {state!r}"[:120])
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    def load_bytearray8(self) -> None:
        """Protocol 5's in-band array buffer, refused before allocating when it claims more bytes than the file has."""
        (length,) = struct.unpack("<Q", self.read(8))
        if length > self.blob_size:
            raise pickle.UnpicklingError(f"a {length}-byte bytearray in a {self.blob_size}-byte pickle")
        buffer = bytearray(length)
        self.readinto(buffer)
        self.append(buffer)

    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8
    blob_size: int = 0  # the length of the pickle being read (safe_unpickle sets it)


def safe_unpickle(blob: bytes, source: str) -> Any:
    """Unpickle CIFAR batch bytes with only numeric numpy arrays and latin-1 bytes allowed; errors name `source`."""
    try:
        unpickler = _NumpyOnlyUnpickler(io.BytesIO(blob), encoding="latin1")
        unpickler.blob_size = len(blob)
        return unpickler.load()
    except DisallowedGlobal as err:
        fail(f"{source}: pickle refers to disallowed global {err} (only plain numeric numpy arrays are allowed); "
             "not loading it")
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
