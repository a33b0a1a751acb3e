"""On-disk embedding cache: memory-mappable .npy files keyed by (weights, data, split, layer, reduction).

Layout: ROOT/<weights digest>/<data digest>-<split>/<layer>.<reduction>.{npy,norms.npy,json}.
The .json sidecar is written last and is the commit marker: it records the key, shape, dtype and
a CRC32 of both arrays. An entry whose sidecar is missing, unreadable, or disagrees with its
arrays (truncated, corrupt, wrong shape) is reported with a warning and rebuilt — never used.
All files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fastmem.io_utils import atomic_path, write_json_atomic

from .extract import Embedding


@dataclass(frozen=True)
class CacheKey:
    """What an embedding depends on."""

    weights: str
    data: str
    split: str
    layer: str
    reduction: str


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


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).data)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


class EmbeddingCache:
    """Get or put layer embeddings under a root directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _paths(self, key: CacheKey) -> tuple[Path, Path, Path]:
        stem = self.root / _safe(key.weights) / f"{_safe(key.data)}-{_safe(key.split)}" / f"{_safe(key.layer)}.{_safe(key.reduction)}"
        return stem.with_suffix(stem.suffix + ".npy"), stem.with_suffix(stem.suffix + ".norms.npy"), stem.with_suffix(stem.suffix + ".json")

    def get(self, key: CacheKey) -> Embedding | None:
        """The cached embedding (memory-mapped), or None on a miss or a damaged entry (with a warning)."""
        vectors_path, norms_path, meta_path = self._paths(key)
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != asdict(key):
                raise ValueError("key mismatch")
            vectors = np.load(vectors_path, mmap_mode="r", allow_pickle=False)
            norms = np.load(norms_path, mmap_mode="r", allow_pickle=False)
            if list(vectors.shape) != meta["shape"] or str(vectors.dtype) != meta["dtype"] or norms.shape != vectors.shape[:1]:
                raise ValueError("shape or dtype differs from the sidecar")
            if _crc(vectors) != meta["crc_vectors"] or _crc(norms) != meta["crc_norms"]:
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
            warnings.warn(f"embedding cache entry {vectors_path} is damaged ({err}); rebuilding it", stacklevel=2)
            meta_path.unlink(missing_ok=True)
            return None
        return Embedding(vectors, norms)

    def put(self, key: CacheKey, embedding: Embedding) -> None:
        """Store an embedding atomically (arrays first, the sidecar last)."""
        vectors_path, norms_path, meta_path = self._paths(key)
        meta_path.unlink(missing_ok=True)  # an entry being replaced is invalid until its sidecar returns
        for path, array in ((vectors_path, embedding.vectors), (norms_path, embedding.norms)):
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as handle:
                    np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        write_json_atomic(meta_path, {
            "key": asdict(key), "shape": list(embedding.vectors.shape), "dtype": str(embedding.vectors.dtype),
            "crc_vectors": _crc(embedding.vectors), "crc_norms": _crc(embedding.norms),
        })
