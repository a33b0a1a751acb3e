"""The `ffcv` backend: FFCV reads and decodes a `.beton` on CPU; the shared executor augments on the device.

Owns the FFCV side only: the file (an existing `.beton` — `make_loader("ffcv", "x.beton")` or
`beton=` — written by `python -m fastmem.pipelines.ffcv write`, or arrays written into a temporary
one: see `TemporaryBeton`, gone from disk once the loader has mapped it), the decode pipeline (raw pixels or JPEG → uint8 NHWC tensor, `ToDevice` on CUDA) and the epoch
iterators, which are FFCV threads: each one is closed and joined when its epoch ends or the consumer
stops early (FFCV's own iterator leaks its thread on an early break). The order, the sharding, the
targets and the per-batch step (parameters, executor: the fastest for the device unless one is
passed) are backends/base.py's, so its views are the device backend's on the same pixels, bit for bit.
"""

from __future__ import annotations

import fcntl
import os
import queue
import shutil
import tempfile
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastmem.pipelines.backends.base import EpochLoader, Executor
from fastmem.pipelines.contract import Batch, LoaderOptions
from fastmem.pipelines.executors.select import apply_views_fastest
from fastmem.pipelines.ffcv import IMAGE_FIELD, LABEL_FIELD, import_ffcv, read_beton_header, write_beton

from fastmem.errors import fail

BATCHES_AHEAD = 2  # batches FFCV decodes ahead of the consumer
TEMP_PREFIX = "fastmem-ffcv-"  # the temporary .beton's folder in the system temp dir: fastmem-ffcv-XXXXXXXX/
TEMP_LOCK = ".lock"  # flocked by the writing process until the file is mapped and the folder removed
UNLOCKED_GRACE_SECONDS = 60.0  # a folder without a lock file this old is an earlier fastmem's leftover


class TemporaryBeton:
    """The folder of one loader's temporary .beton, locked by its process until `remove()`.

    The loader writes the file, opens it (FFCV maps it), then removes the folder at once, on success or
    error: the mapped file lives on in memory and no exit path (a normal end, an exception, SIGTERM or
    SIGINT, SIGKILL) leaves it on disk. A process killed in between (while writing) leaves the folder
    with an unlocked lock file; every new one is made after `remove_stale_betons` has deleted those.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        remove_stale_betons(root)
        self.folder = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=root))
        self._lock_fd: int | None = os.open(self.folder / TEMP_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self.path = self.folder / "source.beton"

    def remove(self) -> None:
        """Delete the folder and its file (a mapping of the file stays valid), then let go of the lock."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def remove_stale_betons(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Delete the temporary .beton folders under `root` (default: the system temp dir) no live process holds.

    A folder's writer holds the flock on its lock file until the folder is gone, so a lock this process
    can take belongs to a process that died (SIGKILL) mid-write; a folder with no lock file is an earlier
    fastmem's (or one created an instant ago: those younger than a minute are left alone).
    """
    removed = []
    for folder in sorted(Path(root or tempfile.gettempdir()).glob(TEMP_PREFIX + "*")):
        try:
            fd = os.open(folder / TEMP_LOCK, os.O_RDWR)
        except FileNotFoundError:
            try:
                if time.time() - folder.stat().st_mtime > UNLOCKED_GRACE_SECONDS:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder)
            except FileNotFoundError:
                pass
            continue
        except OSError:
            continue  # another user's, or not a folder
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(folder, ignore_errors=True)  # its writer died: nobody else can hold the lock now
            removed.append(folder)
        except BlockingIOError:
            pass  # its writer is alive
        finally:
            os.close(fd)
    return removed


def close_epoch_iterator(iterator: Any) -> None:
    """Stop an FFCV EpochIterator thread and release its memory context, once (safe to call again)."""
    if getattr(iterator, "_fastmem_closed", False):
        return
    iterator.terminate_event.set()
    while iterator.is_alive():  # unblock a producer waiting on a full queue (its final put has no timeout)
        try:
            iterator.output_queue.get(timeout=0.05)
        except queue.Empty:
            pass
        iterator.join(timeout=0.05)
    iterator.close()
    iterator.closed = True  # FFCV's close() never sets it: without this, __del__ would exit the context twice
    iterator._fastmem_closed = True


def _decode_threads(options: LoaderOptions, jpeg: bool) -> int:
    """FFCV's decode threads: `workers` if set; else every core for a GPU target, and on CPU few.

    On a CPU target the executor's torch threads need the cores: FFCV's numba threads beside them
    slowed full-augmentation epochs ~10× on 2 cores, and decoding raw pixels is a copy anyway.
    """
    if options.workers:
        return options.workers
    cores = len(os.sched_getaffinity(0))
    if options.device.type == "cuda":
        return cores
    return max(1, cores // 2) if jpeg else 1


class FfcvLoader(EpochLoader):
    """FFCV backend: a .beton (given, or written from `images`) in, contract `Batch`es on `options.device` out."""

    def __init__(
        self,
        images: np.ndarray | torch.Tensor | None,
        targets: np.ndarray | torch.Tensor | None,
        options: LoaderOptions,
        *,
        beton: str | os.PathLike[str] | None = None,
        jpeg_quality: int = 0,
        batches_ahead: int = BATCHES_AHEAD,
        executor: Executor = apply_views_fastest,
    ) -> None:
        """Read `beton`, or write uint8 NHWC `images` to a temporary one; targets default to the file's labels."""
        ffcv = import_ffcv()
        self._ffcv = ffcv
        self._iterator: Any = None
        if beton is None and images is None:
            fail("ffcv: give images to write, or a .beton path (python -m fastmem.pipelines.ffcv write ...)")
        temporary = TemporaryBeton() if beton is None else None
        try:
            if temporary is not None:
                array = images.cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
                labels = np.zeros(len(array), dtype=np.int64) if targets is None else np.asarray(targets, dtype=np.int64)
                beton = write_beton(array, labels, temporary.path, jpeg_quality=jpeg_quality)
            self._open(ffcv, Path(beton), targets, options, batches_ahead, executor, temporary is not None)
        finally:
            if temporary is not None:
                temporary.remove()  # mapped by now (or failed): nothing of it stays on disk

    def _open(self, ffcv: Any, beton: Path, targets: np.ndarray | torch.Tensor | None, options: LoaderOptions,
              batches_ahead: int, executor: Executor, map_now: bool) -> None:
        """Read the file's header and build FFCV's loader; `map_now`: map the file now (it is deleted next)."""
        self.path = beton
        if not self.path.is_file():
            fail(f"{self.path}: no such .beton file (write one with python -m fastmem.pipelines.ffcv write)")
        read_beton_header(self.path)  # FFCV trusts its headers; a damaged one is one line here, before FFCV reads
        try:
            reader = ffcv.reader.Reader(str(self.path))
        except (AssertionError, ValueError, OSError, IndexError) as err:
            fail(f"{self.path}: not a readable FFCV .beton ({err})")
        size, channels, decoder = self._image_layout(ffcv, reader)
        if targets is None:
            if LABEL_FIELD not in reader.field_names:
                fail(f"{self.path}: no '{LABEL_FIELD}' field; pass targets")
            targets = np.array(reader.metadata[f"f{reader.field_names.index(LABEL_FIELD)}"], dtype=np.int64)
        super().__init__(int(reader.num_samples), targets, options, size, channels, executor=executor)
        self.size = self.image_size
        steps: list[Any] = [decoder, ffcv.transforms.ToTensor()]
        if options.device.type == "cuda":
            steps.append(ffcv.transforms.ToDevice(options.device, non_blocking=True))
        pipelines: dict[str, Any] = {name: None for name in reader.field_names}  # decode the images only
        pipelines[IMAGE_FIELD] = steps
        self._loader = ffcv.loader.Loader(
            str(self.path), batch_size=options.batch_size, num_workers=_decode_threads(options, isinstance(decoder, ffcv.fields.decoders.SimpleRGBImageDecoder)),
            order=ffcv.loader.OrderOption.SEQUENTIAL, pipelines=pipelines, drop_last=options.drop_last,
            batches_ahead=max(1, batches_ahead), **({"os_cache": True} if map_now else {}),
        )
        if map_now:  # FFCV's OS-cache context maps the file at its first epoch and keeps the map: map it now
            self._loader.memory_manager.context.mmap = np.memmap(str(self.path), "uint8", mode="r")

    @staticmethod
    def _image_layout(ffcv: Any, reader: Any) -> tuple[tuple[int, int], int, Any]:
        """((H, W), channels, decoder) of the file's image field; every image must have the same size."""
        field = reader.handlers.get(IMAGE_FIELD)
        if isinstance(field, ffcv.fields.NDArrayField) and len(field.shape) == 3 and np.dtype(field.dtype) == np.uint8:
            h, w, c = (int(d) for d in field.shape)
            return (h, w), c, ffcv.fields.decoders.NDArrayDecoder()
        if isinstance(field, ffcv.fields.RGBImageField):
            column = reader.metadata[f"f{reader.field_names.index(IMAGE_FIELD)}"]
            heights, widths = np.unique(column["height"]), np.unique(column["width"])
            if len(heights) != 1 or len(widths) != 1:
                fail(f"{reader.file_name}: images of several sizes; write it with python -m fastmem.pipelines.ffcv write")
            return (int(heights[0]), int(widths[0])), 3, ffcv.fields.decoders.SimpleRGBImageDecoder()
        fail(f"{reader.file_name}: no uint8 H×W×C '{IMAGE_FIELD}' field (write it with python -m fastmem.pipelines.ffcv write)")

    def close(self) -> None:
        """Stop the epoch iterator in flight, if any (iteration does this itself when it ends or breaks)."""
        if self._iterator is not None:
            close_epoch_iterator(self._iterator)
            self._iterator = None

    def __iter__(self) -> Generator[Batch, None, None]:
        self.close()  # an earlier epoch abandoned without closing its generator
        order, bounds = self.epoch_plan("cpu")
        if not bounds:
            return
        order = order[:bounds[-1][1]]  # FFCV batches it in the same consecutive chunks
        # FFCV's Loader.__iter__ would draw its own order; its EpochIterator takes ours as given.
        iterator = self._iterator = self._ffcv.loader.epoch_iterator.EpochIterator(
            self._loader, order.numpy().astype(np.uint64))
        try:
            for lo, hi in bounds:
                if self._iterator is not iterator:
                    raise RuntimeError("this epoch's iterator is stale: a newer iteration of the loader started")
                (pixels,) = next(iterator)  # FFCV's reused buffer: read by the executor, never kept
                yield self.views(pixels[: hi - lo].to(self.options.device, non_blocking=True), order[lo:hi])
        finally:
            close_epoch_iterator(iterator)
            if self._iterator is iterator:
                self._iterator = None

