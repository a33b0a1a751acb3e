"""Fashion-MNIST (and MNIST-style) IDX files: reading, validating, locating, fetching, writing.

Owns the IDX format (big-endian header: magic, dims; uint8 payload), the search for a
Fashion-MNIST directory (--data-dir, $FASTMEM_DATA, Debian's dataset-fashion-mnist, the user
cache, then an optional download) and the test helpers that write IDX files byte-exactly.
"""

from __future__ import annotations

import gzip
import os
import struct
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fastmem.data.types import ArrayDataset
from fastmem.errors import fail
from fastmem.io_utils import atomic_path

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
UBYTE_DTYPE = 0x08

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DOWNLOAD_TIMEOUT_S = 20.0
FILE_STEMS: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

Downloader = Callable[[Path], None]


def cache_dir() -> Path:
    """Where a downloaded Fashion-MNIST is kept (~/.cache/fastmem/fashion-mnist, honours XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fastmem" / "fashion-mnist"


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        fail(f"{path}: cannot read IDX file ({err.strerror or err})")
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        fail(f"{path}: corrupt or truncated gzip data ({' '.join(str(err).split())})")


def _parse_idx(path: Path, expected_magic: int, expected_ndim: int) -> tuple[tuple[int, ...], np.ndarray]:
    """Validate an IDX header and payload; return (dims, flat uint8 payload)."""
    data = _read_bytes(path)
    if len(data) < 4:
        fail(f"{path}: truncated IDX file ({len(data)} bytes, no header)")
    zero, dtype_byte, ndim = struct.unpack(">HBB", data[:4])
    magic = struct.unpack(">I", data[:4])[0]
    if zero != 0:
        fail(f"{path}: wrong magic number {magic} (expected {expected_magic}); not an IDX file")
    if dtype_byte != UBYTE_DTYPE:
        fail(f"{path}: IDX data type 0x{dtype_byte:02x} is not supported (expected 0x08, unsigned byte)")
    if magic != expected_magic:
        fail(f"{path}: wrong magic number {magic} (expected {expected_magic}, {expected_ndim}-dim IDX)")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        fail(f"{path}: truncated IDX header ({len(data)} bytes, need {header_len})")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    if any(d == 0 for d in dims[1:]):
        fail(f"{path}: invalid IDX dimensions {dims}")
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(data) - header_len
    if payload < expected:
        fail(f"{path}: truncated IDX file: header says {dims} = {expected} bytes, found {payload}")
    if payload > expected:
        fail(f"{path}: IDX file has {payload - expected} bytes beyond the {dims} the header declares")
    return dims, np.frombuffer(data, dtype=np.uint8, offset=header_len)


def read_idx_images(path: str | Path) -> np.ndarray:
    """Read an idx3-ubyte image file as a uint8 (N, H, W) array."""
    path = Path(path)
    dims, flat = _parse_idx(path, IMAGES_MAGIC, 3)
    return flat.reshape(dims).copy()


def read_idx_labels(path: str | Path, num_classes: int | None = None) -> np.ndarray:
    """Read an idx1-ubyte label file as int64 (N,), checking labels < num_classes when given."""
    path = Path(path)
    _, flat = _parse_idx(path, LABELS_MAGIC, 1)
    labels = flat.astype(np.int64)
    if num_classes is not None and labels.size and int(labels.max()) >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        fail(f"{path}: label {int(labels[bad])} at index {bad} is out of range for {num_classes} classes")
    return labels


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    """Write header + payload atomically, gzipped when the name ends in .gz."""
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    blob = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        blob = gzip.compress(blob, mtime=0)
    _atomic_write(path, blob)


def write_idx_images(path: str | Path, images: np.ndarray) -> None:
    """Write uint8 (N, H, W) images (or NHWC with C=1) as an IDX3 file; gzip if the path ends in .gz."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W), got {images.dtype} {images.shape}")
    _write_idx(Path(path), IMAGES_MAGIC, images)


def write_idx_labels(path: str | Path, labels: np.ndarray) -> None:
    """Write labels in 0..255 as an IDX1 file; gzip if the path ends in .gz."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() > 255)):
        raise ValueError("labels must be a 1-D array of values in 0..255")
    _write_idx(Path(path), LABELS_MAGIC, labels.astype(np.uint8))


def _atomic_write(path: Path, blob: bytes) -> None:
    """Write bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)


def idx_file(directory: Path, stem: str) -> Path | None:
    """The raw or gzipped file for `stem` in `directory` (raw preferred), or None."""
    for name in (stem, stem + ".gz"):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _holds_fashion_mnist(directory: Path) -> bool:
    """True when the directory holds at least one of the four IDX files."""
    return directory.is_dir() and any(idx_file(directory, stem) for stem in FILE_STEMS)


def download_fashion_mnist(target: Path) -> None:
    """Download the four gzipped IDX files from the Zalando mirror into `target`, atomically."""
    for stem in FILE_STEMS:
        name = stem + ".gz"
        if (target / name).is_file():
            continue
        with urllib.request.urlopen(DOWNLOAD_URL + name, timeout=DOWNLOAD_TIMEOUT_S) as response:
            _atomic_write(target / name, response.read())


def _offline() -> bool:
    """True when $FASTMEM_OFFLINE forbids network access."""
    return os.environ.get("FASTMEM_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def find_fashion_mnist_dir(
    data_dir: str | Path | None,
    *,
    download: Downloader | None = download_fashion_mnist,
    system_dirs: tuple[Path, ...] | None = None,
) -> Path:
    """Locate (or, unless offline or download=None, fetch) the Fashion-MNIST IDX directory."""
    roots = [Path(r) for r in (data_dir, os.environ.get("FASTMEM_DATA")) if r]
    candidates = [c for root in roots for c in (root, root / "fashion-mnist")]
    candidates += list(SYSTEM_DIRS if system_dirs is None else system_dirs)
    candidates.append(cache_dir())
    for candidate in candidates:
        if _holds_fashion_mnist(candidate):
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    why = "downloads disabled"
    if download is not None and not _offline():
        try:
            download(cache_dir())
            if _holds_fashion_mnist(cache_dir()):
                return cache_dir()
            why = "download produced no files"
        except Exception as err:  # noqa: BLE001 - any network/disk failure becomes a user error
            why = f"download from {DOWNLOAD_URL} failed: {' '.join(str(err).split())}"
    fail(
        f"Fashion-MNIST not found (looked in {looked}; {why}); "
        "install it with `apt-get install dataset-fashion-mnist` or pass --data-dir DIR holding the IDX files"
    )


def load_fashion_mnist_split(directory: str | Path, split: str) -> ArrayDataset:
    """Load one split ('train' or 't10k'/'test') from an IDX directory as NHWC (C=1) uint8."""
    directory = Path(directory)
    prefix = SPLIT_PREFIX.get(split, split)
    if prefix not in ("train", "t10k"):
        fail(f"fashion-mnist: unknown split {split!r} (expected 'train' or 'test')")
    found: list[Path] = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        stem = f"{prefix}-{kind}"
        path = idx_file(directory, stem)
        if path is None:
            fail(f"{directory / stem}[.gz]: missing Fashion-MNIST file")
        found.append(path)
    images = read_idx_images(found[0])
    labels = read_idx_labels(found[1], num_classes=len(FASHION_MNIST_CLASSES))
    if labels.shape[0] != images.shape[0]:
        fail(f"{found[1]}: {labels.shape[0]} labels but {found[0]} holds {images.shape[0]} images")
    name = f"fashion-mnist:{'train' if prefix == 'train' else 'test'}"
    return ArrayDataset(images[..., None], labels, FASHION_MNIST_CLASSES, name)


def load_fashion_mnist(
    split: str = "train",
    data_dir: str | Path | None = None,
    *,
    download: Downloader | None = download_fashion_mnist,
) -> ArrayDataset:
    """Find Fashion-MNIST and load the 'train' or 'test' split."""
    return load_fashion_mnist_split(find_fashion_mnist_dir(data_dir, download=download), split)
