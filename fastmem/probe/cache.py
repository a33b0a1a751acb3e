"""On-disk embedding cache: memory-mappable .npy files keyed by what the embedding depends on.

Key: the weights' digest, the data's digest, the split, the layer, and the resolved extraction config
(`ExtractionConfig.digest()`: precision, channels_last, projection dim and seed, forward backend,
batch size, device type, and the code versions — EXTRACTION_VERSION, fastmem's and torch's), plus
the cache's own CACHE_FORMAT_VERSION. A change in any of them is a miss, never a stale reuse.
Layout: ROOT/<weights>/<data>-<split>/<layer>.<reduction>.<digest of format and config>.{npy,norms.npy,json}.

Entries are written by streaming (stream.py): the arrays through atomic temp files renamed into
place, then the .json sidecar, the commit marker, which records the key, the shapes, dtypes and a
CRC32 of each array's data. On reading, an entry whose sidecar or arrays are unreadable, truncated,
0-byte, garbage, of another shape or dtype, fail the checksum or belong to another key gives a
warning naming the file (`EmbeddingCacheWarning`) and is rebuilt — never used, never a traceback.
Verification reads the files in chunks, so it costs no more RAM than a chunk. Files in the cache
directory that are not an entry's are never read or touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fastmem.io_utils import write_json_atomic

from .extract import Embedding
from .stream import DiskSink, WrittenArray, write_embedding

CACHE_FORMAT_VERSION = 2  # bump when the files' layout or the sidecar's fields change
_READ_CHUNK = 16 << 20
# What reading arbitrary bytes as JSON or .npy can raise; each is a damaged entry.
_UNREADABLE = (OSError, ValueError, TypeError, KeyError, IndexError, EOFError, SyntaxError, OverflowError)


class EmbeddingCacheWarning(UserWarning):
    """A cache entry was damaged (and is rebuilt), or the cache could not be written (the probe goes on)."""


@dataclass(frozen=True)
class CacheKey:
    """What an embedding depends on."""

    weights: str
    data: str
    split: str
    layer: str
    reduction: str  # readable summary of the config (file names)
    config: str = ""  # ExtractionConfig.digest(): the resolved options and code versions
    format: int = CACHE_FORMAT_VERSION


def state_digest(model: torch.nn.Module) -> str:
    """A digest of the model's weights and buffers (same weights → same digest, wherever they came from)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def data_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """A digest of the images and labels (CRC32 based: cheap on tens of MB)."""
    crc = zlib.crc32(np.ascontiguousarray(images).data)
    crc = zlib.crc32(np.ascontiguousarray(labels).data, crc)
    return f"{images.shape[0]}x{'x'.join(map(str, images.shape[1:]))}-{crc:08x}"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


class _Damaged(Exception):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} {reason}")
        self.path, self.reason = path, reason


def _read_sidecar(path: Path, key: CacheKey) -> dict:
    try:
        meta = json.loads(path.read_text())
    except _UNREADABLE as err:
        raise _Damaged(path, f"is not a readable JSON sidecar ({type(err).__name__}: {err})") from err
    if not isinstance(meta, dict):
        raise _Damaged(path, "is not a JSON object")
    if meta.get("format") != key.format:
        raise _Damaged(path, f"has cache format {meta.get('format')!r}, expected {key.format}")
    if meta.get("key") != asdict(key):
        raise _Damaged(path, "belongs to another cache entry (its key differs)")
    for part in ("vectors", "norms"):
        record = meta.get(part)
        if not (isinstance(record, dict) and isinstance(record.get("shape"), list) and isinstance(record.get("dtype"), str)
                and all(isinstance(n, int) for n in record["shape"]) and isinstance(record.get("crc32"), int)):
            raise _Damaged(path, f"has no valid {part!r} record")
    return meta


def _check_array(path: Path, record: dict) -> None:
    """Raises _Damaged unless `path` is a .npy of the recorded shape and dtype whose data has the recorded CRC32."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise _Damaged(path, f"has unsupported .npy version {version}")
            shape, fortran, dtype = read_header[version](handle)
            if fortran or dtype.hasobject or list(shape) != record["shape"] or str(dtype) != record["dtype"]:
                raise _Damaged(path, f"holds {dtype} {tuple(shape)}, the sidecar says {record['dtype']} "
                                     f"{tuple(record['shape'])}")
            expected = handle.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            size = os.fstat(handle.fileno()).st_size
            if size != expected:
                raise _Damaged(path, f"is {size} bytes, expected {expected} ({'truncated' if size < expected else 'trailing data'})")
            crc, buffer = 0, bytearray(min(_READ_CHUNK, max(size, 1)))
            while count := handle.readinto(buffer):
                crc = zlib.crc32(memoryview(buffer)[:count], crc)
    except _Damaged:
        raise
    except _UNREADABLE as err:
        raise _Damaged(path, f"is not a readable .npy file ({type(err).__name__}: {err})") from err
    if crc != record["crc32"]:
        raise _Damaged(path, "fails its checksum (corrupt data)")


def _record(written: WrittenArray) -> dict:
    return {"shape": list(written.shape), "dtype": written.dtype, "crc32": written.crc32}


class EmbeddingCache:
    """Get or put layer embeddings under a root directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _paths(self, key: CacheKey) -> tuple[Path, Path, Path]:
        version = hashlib.sha256(f"{key.format}:{key.config}".encode()).hexdigest()[:12]
        stem = (self.root / _safe(key.weights) / f"{_safe(key.data)}-{_safe(key.split)}"
                / f"{_safe(key.layer)}.{_safe(key.reduction)}.{version}")
        return tuple(stem.with_name(stem.name + suffix) for suffix in (".npy", ".norms.npy", ".json"))  # type: ignore[return-value]

    def get(self, key: CacheKey) -> Embedding | None:
        """The cached embedding (memory-mapped), or None on a miss or a damaged entry (with a warning)."""
        vectors_path, norms_path, meta_path = self._paths(key)
        if not meta_path.exists():
            return None
        try:
            meta = _read_sidecar(meta_path, key)
            _check_array(vectors_path, meta["vectors"])
            _check_array(norms_path, meta["norms"])
            if meta["norms"]["shape"] != meta["vectors"]["shape"][:1]:
                raise _Damaged(meta_path, "records norms that do not match the vectors")
            try:
                embedding = Embedding(np.load(vectors_path, mmap_mode="r", allow_pickle=False),
                                      np.load(norms_path, mmap_mode="r", allow_pickle=False))
            except _UNREADABLE as err:
                raise _Damaged(vectors_path, f"cannot be mapped ({err})") from err
        except _Damaged as damage:
            warnings.warn(f"embedding cache entry {damage.path} {damage.reason}; rebuilding it",
                          EmbeddingCacheWarning, stacklevel=2)
            with contextlib.suppress(OSError):
                meta_path.unlink(missing_ok=True)
            return None
        return embedding

    def writer(self, keys: Mapping[str, CacheKey], config: Mapping[str, object] | None = None) -> DiskSink:
        """A sink that streams the layers of `keys` into their entries; the sidecars are written last, on commit.

        `config` (the resolved extraction config) is recorded in each sidecar for whoever reads it.
        """
        def paths(layer: str) -> tuple[Path, Path]:
            vectors_path, norms_path, meta_path = self._paths(keys[layer])
            with contextlib.suppress(OSError):  # an entry being replaced is invalid until its sidecar returns
                meta_path.unlink(missing_ok=True)
            return vectors_path, norms_path

        def write_sidecar(layer: str, vectors: WrittenArray, norms: WrittenArray) -> None:
            key = keys[layer]
            payload = {"format": key.format, "key": asdict(key), "vectors": _record(vectors), "norms": _record(norms)}
            if config is not None:
                payload["config"] = dict(config)
            write_json_atomic(self._paths(key)[2], payload)

        return DiskSink(paths, write_sidecar)

    def put(self, key: CacheKey, embedding: Embedding) -> None:
        """Store an in-memory embedding (arrays first, the sidecar last); EmbeddingWriteError if the disk refuses."""
        write_embedding(self.writer({key.layer: key}), key.layer, embedding)
