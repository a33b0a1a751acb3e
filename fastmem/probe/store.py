"""Where a probe's freshly extracted embeddings go, and what happens when the disk refuses them.

`EmbeddingStore` is made once per probe and shared by its splits: with a cache, rows stream into the
cache's entries; without one, small layers stay in RAM and large ones are spilled to a temp file
(stream.py's `SpillSink`). When a disk write fails (a full disk, a file size limit, a directory in
the way) it warns once, on one line naming the file, and from then on the probe keeps its embeddings
in memory: the answer is the same, only the cache (and the bound on memory) is lost for this run.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from .cache import CacheKey, EmbeddingCache, EmbeddingCacheWarning
from .extract import Embedding, EmbeddingSink, ExtractionConfig, MemorySink
from .stream import SPILL_BYTES, EmbeddingWriteError, SpillSink


class EmbeddingStore:
    """The sink for a split's missing layers: the cache, else RAM or a spill file; RAM after a failed write."""

    def __init__(self, cache: EmbeddingCache | None, spill_bytes: int = SPILL_BYTES) -> None:
        self.cache = cache
        self.spill_bytes = spill_bytes
        self.write_failure: EmbeddingWriteError | None = None

    def sink(self, keys: Mapping[str, CacheKey], config: ExtractionConfig) -> EmbeddingSink:
        if self.write_failure is not None:
            return MemorySink()
        if self.cache is not None:
            return self.cache.writer(keys, config.identity())
        return SpillSink(self.spill_bytes)

    def failed(self, error: EmbeddingWriteError) -> None:
        """Warn (once per probe) and keep embeddings in memory from now on."""
        if self.write_failure is None:
            where = "the embedding cache" if self.cache is not None else "a temporary embedding file"
            warnings.warn(f"could not write {where} ({error}); the probe goes on with its embeddings in memory",
                          EmbeddingCacheWarning, stacklevel=3)
        self.write_failure = error

    def put(self, key: CacheKey, embedding: Embedding) -> None:
        """Cache an in-memory embedding (the distributed path's rank 0), unless a write already failed."""
        if self.cache is None or self.write_failure is not None:
            return
        try:
            self.cache.put(key, embedding)
        except EmbeddingWriteError as error:
            self.failed(error)
