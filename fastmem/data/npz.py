"""Reading `.npz` archives fastmem wrote, safely: plain arrays only, every member checked before use.

The archive is parsed here, not by np.load: no pickled objects, and every array's header is checked
against the bytes it has before anything is allocated (a damaged header cannot ask for gigabytes). A
truncated, garbage or foreign file is one line naming it (FastmemError), never a traceback.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fastmem.errors import fail

# What a member may hold, by numpy dtype kind: "i" integers (unsigned too), "b" booleans, "f" floats, "U" text.
KIND_NAMES = {"i": "integers", "b": "booleans", "f": "a float", "U": "text"}


class _BadMember(Exception):
    """What is wrong with one member of an archive (turned into a FastmemError naming the file)."""


def read_npz(path: str | Path, kinds: Mapping[str, str], what: str) -> dict[str, np.ndarray]:
    """The arrays `kinds` names (name → dtype kind) from the archive at `path`; `what` names the file's role
    in the one-line error ("labels file")."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        fail(f"{path}: cannot read the {what} ({err.strerror or err})")
    if not raw:
        fail(f"{path}: empty file; not a {what}")
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            return {name: _read_member(archive, name, kind, len(raw)) for name, kind in kinds.items()}
    except _BadMember as err:
        fail(f"{path}: {err}; not a readable {what}")
    except Exception as err:  # noqa: BLE001 - zipfile/zlib raise many types for damaged archives
        fail(f"{path}: not a readable {what} ({type(err).__name__}: {' '.join(str(err).split())[:120]})")


def _read_member(archive: zipfile.ZipFile, name: str, kind: str, archive_size: int) -> np.ndarray:
    """One `name.npy` member: a plain (non-object) array of the expected kind, its size checked first."""
    try:
        info = archive.getinfo(name + ".npy")
    except KeyError:
        raise _BadMember(f"no {name!r} array") from None
    if info.file_size > 64 * archive_size + (1 << 20):
        raise _BadMember(f"{name!r} claims {info.file_size} bytes")
    blob = archive.read(info)
    stream = io.BytesIO(blob)
    try:
        major, _ = np.lib.format.read_magic(stream)
        if major not in (1, 2):
            raise ValueError(f".npy format version {major}")
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
    except (ValueError, OSError, SyntaxError) as err:
        raise _BadMember(f"{name!r} has no valid .npy header ({' '.join(str(err).split())[:80]})") from None
    if dtype.hasobject or dtype.kind != kind and not (kind == "i" and dtype.kind == "u"):
        raise _BadMember(f"{name!r} has dtype {dtype}, expected {KIND_NAMES[kind]}")
    count = math.prod(shape)
    if count < 0 or count * dtype.itemsize != len(blob) - stream.tell():
        raise _BadMember(f"{name!r} is truncated or padded ({len(blob) - stream.tell()} data bytes for shape {shape})")
    array = np.frombuffer(blob, dtype=dtype, count=count, offset=stream.tell())
    return array.reshape(shape, order="F" if fortran else "C").copy()
