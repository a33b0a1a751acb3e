"""FFCV `.beton` files for every fastmem source, and their CLI: `python -m fastmem.pipelines.ffcv write ...`.

Owns the on-disk layout the `ffcv` backend reads (backends/ffcv.py; `make_loader("ffcv", "x.beton")`
reads an existing file): an `image` field holding each sample's uint8 H×W×C pixels and a `label`
field holding its true label, in source order, so sample index i of the file is sample i of
`fastmem.data.load_arrays(name, split, data_dir)`. Pixels are stored raw (NDArrayField: identical to
what every other backend sees) or, for 3-channel sources on request, as JPEG (RGBImageField:
smaller files, decoded by FFCV on CPU). Image folders go through the source's own decode and
resize, so every backend trains on the same pixels. Augmentation is not stored: the loader executes
the shared sampler's parameters.

`read_beton_header` checks a `.beton` (version, field table, metadata and allocation table against the file's
size, every sample's data pointer) with numpy alone, before FFCV maps it: FFCV itself meets a truncated or
garbage file with assertion, index or type errors, or with a loader thread that never returns. The ffcv
backend (backends/ffcv.py) runs it on every file before FFCV opens it.

(This module's name shadows nothing: `import ffcv` below is absolute and finds the FFCV package.)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmem.errors import fail, run_cli
from fastmem.io_utils import atomic_path

FFCV_MISSING = "the ffcv pipeline needs FFCV: pip install -e .[ffcv] (builds against pkg-config's opencv4 and libturbojpeg)"
IMAGE_FIELD, LABEL_FIELD = "image", "label"


def import_ffcv() -> Any:
    """The `ffcv` package, or a one-line FastmemError naming the extra to install.

    FFCV sets torch's process-wide thread count whenever it sets its own (to 1 on import, to its
    worker count per epoch, from its epoch thread): its Compiler is patched to set numba's only,
    and the count torch had before the import is restored.
    """
    first = "ffcv" not in sys.modules
    torch_threads = torch.get_num_threads()
    try:
        import ffcv  # noqa: F401  (absolute: the FFCV package, not this module)
        import ffcv.fields
        import ffcv.fields.decoders
        import ffcv.loader
        import ffcv.loader.epoch_iterator
        import ffcv.pipeline.compiler
        import ffcv.reader
        import ffcv.transforms
        import ffcv.writer
    except ImportError as err:
        fail(f"{FFCV_MISSING} ({err})")
    compiler = ffcv.pipeline.compiler.Compiler
    if not getattr(compiler, "_fastmem_numba_only", False):
        compiler.set_num_threads = classmethod(_set_numba_threads)
        compiler._fastmem_numba_only = True
        if first:
            torch.set_num_threads(torch_threads)
    return ffcv


def _set_numba_threads(cls: Any, n: int) -> None:
    """FFCV's Compiler.set_num_threads without its torch.set_num_threads (numba's setting is per thread)."""
    import numba

    n = n if n >= 1 else len(os.sched_getaffinity(0))
    cls.num_threads = n
    numba.set_num_threads(n)


# FFCV's on-disk layout (ffcv/types.py, format version 2), restated so a file is checked before FFCV reads it.
BETON_VERSION = 2
_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"), ("num_samples", "<u8"),
                    ("alloc_table_ptr", "<u8")], align=True)
_FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
_ALLOC_ENTRY = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
_NDARRAY_ARGS = np.dtype([("shape", "<u8", 32), ("type_length", "<u8")])
_POINTER_STRUCT = np.dtype([("ptr", "<u8"), ("size", "<u8")])
# type id -> (kind, per-sample metadata dtype, the metadata entry that points into the allocation table)
_FIELD_KINDS: dict[int, tuple[str, np.dtype, str | None]] = {
    0: ("float", np.dtype("<f8"), None),
    1: ("int", np.dtype("<i8"), None),
    2: ("rgb_image", np.dtype([("mode", "u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")]), "data_ptr"),
    3: ("bytes", _POINTER_STRUCT, "ptr"),
    4: ("ndarray", np.dtype("<u8"), ""),
    5: ("json", _POINTER_STRUCT, "ptr"),
    6: ("torch_tensor", np.dtype("<u8"), ""),
}
MAX_FIELDS = 64


@dataclass(frozen=True)
class BetonField:
    """One field of a .beton: its name, kind (int, ndarray, rgb_image, ...) and, for arrays, dtype and shape."""

    name: str
    kind: str
    dtype: np.dtype | None = None
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class BetonHeader:
    """What a checked .beton declares: sample count, page size and fields in order."""

    path: Path
    num_samples: int
    page_size: int
    fields: tuple[BetonField, ...]


def read_beton_header(path: str | os.PathLike[str]) -> BetonHeader:
    """Check an FFCV .beton's header, field table, metadata and allocation table; one line naming it if damaged."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            return _checked_header(path, handle, size)
    except OSError as err:
        fail(f"{path}: cannot read the .beton ({err.strerror or err})")


def _bad(path: Path, what: str) -> None:
    fail(f"{path}: {what}; not a readable FFCV .beton (write one with python -m fastmem.pipelines.ffcv write)")


def _read_at(handle: Any, offset: int, count: int, dtype: np.dtype) -> np.ndarray:
    handle.seek(offset)
    return np.frombuffer(handle.read(count * dtype.itemsize), dtype=dtype, count=count)


def _checked_header(path: Path, handle: Any, size: int) -> BetonHeader:
    if size < _HEADER.itemsize:
        _bad(path, f"{size} bytes, shorter than the {_HEADER.itemsize}-byte header (truncated?)")
    header = _read_at(handle, 0, 1, _HEADER)[0]
    version, num_fields = int(header["version"]), int(header["num_fields"])
    page_size, num_samples, table = int(header["page_size"]), int(header["num_samples"]), int(header["alloc_table_ptr"])
    if version != BETON_VERSION:
        _bad(path, f"format version {version}, expected {BETON_VERSION}")
    if not 1 <= num_fields <= MAX_FIELDS:
        _bad(path, f"{num_fields} fields declared")
    if page_size < 1 or page_size & (page_size - 1):
        _bad(path, f"page size {page_size} is not a power of two")
    fields_end = _HEADER.itemsize + num_fields * _FIELD_DESC.itemsize
    if fields_end > size:
        _bad(path, f"{size} bytes, too short for its {num_fields} field descriptors (truncated?)")
    descriptors = _read_at(handle, _HEADER.itemsize, num_fields, _FIELD_DESC)
    fields = tuple(_field(path, d) for d in descriptors)
    if len({f.name for f in fields}) != len(fields):
        _bad(path, "duplicate field names")
    kinds = [_FIELD_KINDS[int(d["type_id"])] for d in descriptors]
    metadata_type = np.dtype([(f"f{i}", kind[1]) for i, kind in enumerate(kinds)], align=True)
    metadata_end = fields_end + num_samples * metadata_type.itemsize
    if not metadata_end <= table <= size or (size - table) % _ALLOC_ENTRY.itemsize:
        _bad(path, f"allocation table at byte {table} does not fit {num_samples} samples' metadata in {size} bytes "
                   "(truncated?)")
    entries = _read_at(handle, table, (size - table) // _ALLOC_ENTRY.itemsize, _ALLOC_ENTRY)
    ends = entries["ptr"].astype(np.uint64) + entries["size"]
    if entries.size and (int(entries["ptr"].min()) < metadata_end or int(ends.max()) > table
                         or int(entries["sample_id"].max()) >= num_samples or bool((ends < entries["ptr"]).any())):
        _bad(path, "allocation table points outside the file's data")
    metadata = _read_at(handle, fields_end, num_samples, metadata_type)
    known = entries["ptr"]
    for i, (field, kind) in enumerate(zip(fields, kinds)):
        pointer = kind[2]
        if pointer is None:
            continue
        column = metadata[f"f{i}"] if pointer == "" else metadata[f"f{i}"][pointer]
        if not np.isin(column, known).all():
            _bad(path, f"field {field.name!r}: a sample's data is missing from the allocation table")
    return BetonHeader(path, num_samples, page_size, fields)


def _field(path: Path, descriptor: np.void) -> BetonField:
    """A field descriptor, checked: known type, printable name, readable array arguments."""
    type_id = int(descriptor["type_id"])
    raw_name = bytes(descriptor["name"]).split(b"\0", 1)[0]
    if type_id not in _FIELD_KINDS:
        _bad(path, f"field type {type_id} is not one fastmem reads")
    try:
        name = raw_name.decode("ascii")
    except UnicodeDecodeError:
        name = ""
    if not name or not name.isprintable():
        _bad(path, f"field name {raw_name!r} is not printable text")
    kind = _FIELD_KINDS[type_id][0]
    if kind not in ("ndarray", "torch_tensor"):
        return BetonField(name, kind)
    arguments = np.asarray(descriptor["arguments"])
    args = arguments[: _NDARRAY_ARGS.itemsize].view(_NDARRAY_ARGS)[0]
    length = int(args["type_length"])
    shape = [int(d) for d in args["shape"]]
    while shape and shape[-1] == 0:
        shape.pop()
    try:
        if not 0 < length <= arguments.size - _NDARRAY_ARGS.itemsize or not shape or 0 in shape:
            raise ValueError("array shape or dtype length")
        description = json.loads(arguments[_NDARRAY_ARGS.itemsize:][:length].tobytes().decode("ascii"))
        if not isinstance(description, list) or len(description) != 1 or not isinstance(description[0], list) \
                or not all(isinstance(part, str) for part in description[0]):
            raise ValueError("dtype description")
        dtype = np.dtype([tuple(description[0])])["f0"]
    except (ValueError, TypeError, RecursionError) as err:
        _bad(path, f"field {name!r}: unreadable array arguments ({' '.join(str(err).split())[:80]})")
    if dtype.hasobject:
        _bad(path, f"field {name!r}: object arrays")
    return BetonField(name, kind, dtype, tuple(shape))


class _Samples:
    """(image, label) pairs in the shape FFCV's writer indexes."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


def write_beton(
    images: np.ndarray,
    labels: np.ndarray,
    out: str | Path,
    *,
    jpeg_quality: int = 0,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write uint8 NHWC `images` and int `labels` to a .beton at `out` (raw pixels, or JPEG if quality > 0)."""
    ffcv = import_ffcv()
    out = Path(out)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        fail(f"{out}: images must be uint8 NHWC with 1 or 3 channels, got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        fail(f"{out}: {labels.shape[0] if labels.ndim else 0} labels for {images.shape[0]} images")
    if len(images) == 0:
        fail(f"{out}: no images to write")
    if not 0 <= jpeg_quality <= 100:
        fail(f"--jpeg-quality must be in 0..100 (0 = raw pixels), got {jpeg_quality}")
    if jpeg_quality and images.shape[3] != 3:
        fail(f"{out}: JPEG storage needs 3-channel images; these have {images.shape[3]} (use --jpeg-quality 0)")
    if out.exists() and not overwrite:
        fail(f"{out} exists; pass --overwrite to replace it")
    if jpeg_quality:
        image_field = ffcv.fields.RGBImageField(write_mode="jpg", jpeg_quality=jpeg_quality)
    else:
        image_field = ffcv.fields.NDArrayField(np.dtype("uint8"), tuple(int(d) for d in images.shape[1:]))
    fields = {IMAGE_FIELD: image_field, LABEL_FIELD: ffcv.fields.IntField()}
    with atomic_path(out) as tmp:  # a failed or interrupted write leaves any previous file intact
        writer = ffcv.writer.DatasetWriter(str(tmp), fields, num_workers=max(1, workers))
        bar = ffcv.writer.tqdm
        ffcv.writer.tqdm = bar if progress else functools.partial(bar, disable=True)  # FFCV has no switch
        try:
            writer.from_indexed_dataset(_Samples(np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)))
        finally:
            ffcv.writer.tqdm = bar
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a temporary file is private; the dataset file need not be
    return out


def write_dataset_beton(
    dataset: str,
    out: str | Path,
    *,
    split: str = "train",
    data_dir: str | Path | None = None,
    image_size: int | None = None,
    synthetic_size: int = 5000,
    seed: int = 0,
    jpeg_quality: int = 0,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write `split` of a named source (any of fastmem.data's) to a .beton; sample i = load_arrays' sample i."""
    from fastmem.data import load_arrays

    import_ffcv()  # fail before decoding a whole dataset
    ds = load_arrays(dataset, split, data_dir, synthetic_size=synthetic_size, image_size=image_size, seed=seed)
    return write_beton(ds.images, ds.labels, out, jpeg_quality=jpeg_quality, workers=workers, overwrite=overwrite,
                       progress=progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastmem.pipelines.ffcv", description="FFCV .beton files for the ffcv pipeline backend.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser(
        "write", help="write a dataset split to OUT.beton", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    write.add_argument("out", metavar="OUT.beton", help="output file")
    write.add_argument("--dataset", required=True, help="fashion-mnist, cifar10, cifar100, imagefolder, synthetic")
    write.add_argument("--data-dir", default=None, help="where the dataset files are (else $FASTMEM_DATA, then system locations)")
    write.add_argument("--split", default="train", choices=("train", "test"), help="which split")
    write.add_argument("--image-size", type=int, default=0, help="decode size for imagefolder and synthetic (0 = 64 / 32)")
    write.add_argument("--synthetic-size", type=int, default=5000, help="training samples of the synthetic source")
    write.add_argument("--seed", type=int, default=0, help="seed of the synthetic source")
    write.add_argument("--jpeg-quality", type=int, default=0, help="store 3-channel images as JPEG of this quality (0 = raw pixels)")
    write.add_argument("--workers", type=int, default=1, help="FFCV writer processes")
    write.add_argument("--overwrite", action="store_true", help="replace OUT.beton if it exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = write_dataset_beton(
        args.dataset, args.out, split=args.split, data_dir=args.data_dir, image_size=args.image_size or None,
        synthetic_size=args.synthetic_size, seed=args.seed, jpeg_quality=args.jpeg_quality, workers=args.workers,
        overwrite=args.overwrite, progress=True,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
