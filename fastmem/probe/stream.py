"""Embeddings streamed to disk batch by batch: .npy files appended through atomic temp files.

Owns the disk sinks of extraction (extract.py's `EmbeddingSink`). `NpyAppender` writes one .npy file
(header first, then rows in order) to a temporary file named as `fastmem.io_utils.atomic_path` names
them, tracking the CRC32 of the data as it goes; nothing is renamed into place until every layer's
files are complete (`DiskSink.commit`), and a failure removes every temp file (`discard`). Writes go
through plain file handles, not a writable memmap, so the rows written leave the process's resident
set as soon as the kernel writes them back (a writable memmap keeps every page it touched resident).
An OSError while writing (a full disk, ENOSPC/EFBIG, a directory in the way) surfaces as
`EmbeddingWriteError` naming the file, for the caller to warn and go on in memory.

`SpillSink` is the no-cache path: layers up to `spill_bytes` (float16) stay in RAM; larger ones go to
a private temporary directory that is deleted as soon as they are memory-mapped (the mappings keep
the data alive; the disk space returns when they are dropped).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastmem.io_utils import atomic_path
from fastmem.kernels import HOST_CHUNK_BYTES

from .extract import Embedding, MemorySink

SPILL_BYTES = HOST_CHUNK_BYTES  # a no-cache layer larger than this (float16 bytes) is spilled to a temp file


class EmbeddingWriteError(Exception):
    """Writing an embedding file failed (the disk is full, a file is in the way, …)."""

    def __init__(self, path: Path, error: OSError) -> None:
        super().__init__(f"{path}: {error.strerror or error}")
        self.path = path
        self.error = error


@dataclass(frozen=True)
class WrittenArray:
    """What was written to one .npy file: where, its shape and dtype, and the CRC32 of its data."""

    path: Path
    shape: tuple[int, ...]
    dtype: str
    crc32: int


class NpyAppender:
    """One .npy file written row block by row block into an atomic temp file held open on `stack`.

    `durable=False` (scratch files in a private directory) writes `path` itself, with no fsync.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, stack: contextlib.ExitStack,
                 durable: bool = True) -> None:
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self._rows = 0
        self._crc = 0
        with _naming(path):
            tmp = stack.enter_context(atomic_path(path)) if durable else path
            self._handle = stack.enter_context(open(tmp, "wb"))
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(self._handle, header)

    def append(self, rows: np.ndarray) -> None:
        block = np.ascontiguousarray(rows, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:] or self._rows + len(block) > self.shape[0]:
            raise ValueError(f"{self.path}: rows of shape {block.shape} do not fit {self.shape}")
        data = memoryview(block).cast("B")
        with _naming(self.path):
            self._handle.write(data)
        self._crc = zlib.crc32(data, self._crc)
        self._rows += len(block)

    def finish(self) -> WrittenArray:
        """Flush and close the temp file (it is renamed when the stack closes)."""
        if self._rows != self.shape[0]:
            raise ValueError(f"{self.path}: {self._rows} rows written of {self.shape[0]}")
        with _naming(self.path):
            self._handle.close()
        return WrittenArray(self.path, self.shape, str(self.dtype), self._crc)


@contextlib.contextmanager
def _naming(path: Path):  # type: ignore[no-untyped-def]
    """OSError → EmbeddingWriteError naming `path`."""
    try:
        yield
    except OSError as error:  # a failed rename names its target second
        raise EmbeddingWriteError(Path(error.filename2 or path), error) from error


LayerPaths = Callable[[str], tuple[Path, Path]]
OnCommit = Callable[[str, WrittenArray, WrittenArray], None]


class DiskSink:
    """Each layer's vectors and norms appended to .npy files, renamed into place together on commit.

    `paths(layer)` gives the (vectors, norms) targets; `on_commit` runs per layer once all are in place
    (the cache writes its sidecars there). `commit` returns read-only memmaps of the files.
    """

    def __init__(self, paths: LayerPaths, on_commit: OnCommit | None = None, durable: bool = True) -> None:
        self._paths, self._on_commit, self._durable = paths, on_commit, durable
        self._stack = contextlib.ExitStack()
        self._layers: dict[str, tuple[NpyAppender, NpyAppender]] = {}

    def open(self, layer: str, rows: int, width: int, vector_dtype: np.dtype = np.dtype(np.float16),
             norm_dtype: np.dtype = np.dtype(np.float32)) -> None:
        vectors_path, norms_path = self._paths(layer)
        self._layers[layer] = (NpyAppender(vectors_path, (rows, width), vector_dtype, self._stack, self._durable),
                               NpyAppender(norms_path, (rows,), norm_dtype, self._stack, self._durable))

    def append(self, layer: str, vectors: np.ndarray, norms: np.ndarray) -> None:
        vector_file, norm_file = self._layers[layer]
        vector_file.append(vectors)
        norm_file.append(norms)

    def commit(self) -> dict[str, Embedding]:
        written = {layer: (vectors.finish(), norms.finish()) for layer, (vectors, norms) in self._layers.items()}
        first = next(iter(written.values()))[0].path if written else Path(".")
        with _naming(first):
            self._stack.close()  # every temp file renamed into place (or all removed, on an error)
        for layer, (vectors, norms) in written.items():
            if self._on_commit is not None:
                with _naming(vectors.path):
                    self._on_commit(layer, vectors, norms)
        return {layer: Embedding(np.load(vectors.path, mmap_mode="r"), np.load(norms.path, mmap_mode="r"))
                for layer, (vectors, norms) in written.items()}

    def discard(self, error: BaseException) -> None:
        """Remove every temp file written so far (idempotent)."""
        self._stack.__exit__(type(error), error, error.__traceback__)
        self._layers.clear()


def write_embedding(sink: DiskSink, layer: str, embedding: Embedding,
                    chunk_bytes: int = HOST_CHUNK_BYTES) -> dict[str, Embedding]:
    """Write an in-memory embedding through `sink` in row chunks of at most `chunk_bytes`."""
    vectors, norms = embedding.vectors, embedding.norms
    try:
        sink.open(layer, vectors.shape[0], vectors.shape[1], vectors.dtype, norms.dtype)
        step = max(1, chunk_bytes // max(1, vectors[:1].nbytes))
        for start in range(0, vectors.shape[0], step):
            sink.append(layer, vectors[start : start + step], norms[start : start + step])
        return sink.commit()
    except BaseException as error:
        sink.discard(error)
        raise


class SpillSink:
    """The no-cache sink: small layers in RAM, layers over `spill_bytes` in a temp directory (deleted on commit)."""

    def __init__(self, spill_bytes: int = SPILL_BYTES) -> None:
        self._spill_bytes = spill_bytes
        self._memory = MemorySink()
        self._directory: Path | None = None
        self._disk = DiskSink(self._spill_paths, durable=False)  # scratch: removed on commit anyway
        self._spilled: set[str] = set()

    def _spill_paths(self, layer: str) -> tuple[Path, Path]:
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="fastmem-embeddings-"))
        stem = self._directory / f"layer{len(self._spilled)}"  # layer names need not be file names
        return stem.with_suffix(".npy"), stem.with_suffix(".norms.npy")

    def open(self, layer: str, rows: int, width: int) -> None:
        if rows * width * 2 > self._spill_bytes:
            try:
                self._disk.open(layer, rows, width)
            except OSError as error:  # the temp directory itself could not be made
                raise EmbeddingWriteError(Path(tempfile.gettempdir()), error) from error
            self._spilled.add(layer)
        else:
            self._memory.open(layer, rows, width)

    def append(self, layer: str, vectors: np.ndarray, norms: np.ndarray) -> None:
        (self._disk if layer in self._spilled else self._memory).append(layer, vectors, norms)

    def commit(self) -> dict[str, Embedding]:
        try:
            return {**self._memory.commit(), **self._disk.commit()}
        finally:
            self._remove_directory()

    def discard(self, error: BaseException) -> None:
        self._memory.discard(error)
        self._disk.discard(error)
        self._remove_directory()

    def _remove_directory(self) -> None:
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
