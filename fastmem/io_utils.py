"""Atomic file writes: write to a temporary file beside the target, fsync it, rename it over the target,
then fsync the directory, so a crash leaves either the old file or the new one, never a torn one.

Temporary files are named `.<target name>.<8 random characters>.tmp` (`is_fastmem_temp` recognizes them,
and the one other temp name fastmem uses, the TensorRT engine cache's `.<stem>.<pid>.tmp.ep`), so a run
directory's opener can remove the ones an interrupted process left behind (`fastmem.run.lock`).
Outputs get the mode an ordinary `open(..., "w")` gives: 0o666 less the process umask.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastmem.errors import DiskFullError, disk_full_errno

TEMP_SUFFIX = ".tmp"
# `.<name>.<8 chars>.tmp`: atomic_path's names (and tempfile.mkstemp's, which earlier versions used).
_ATOMIC_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
# `.<stem>.<pid>.tmp.ep`: fastmem.probe.trt_extract.save_engine's names.
_ENGINE_TEMP = re.compile(r"^\..+\.[0-9]+\.tmp\.ep$")


def is_fastmem_temp(name: str) -> bool:
    """True for a file name that only fastmem's atomic writers produce (never a finished output)."""
    return bool(_ATOMIC_TEMP.match(name) or _ENGINE_TEMP.match(name))


def _create_temp(target: Path) -> Path:
    """A new, empty temporary file beside `target`, created with mode 0o666 less the umask."""
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename in it) to disk; a no-op where the filesystem cannot."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def umask_mode(mode: int = 0o666) -> int:
    """`mode` less the process umask (read from /proc where it can be, without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return mode & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return mode & ~current


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` atomically, else it is removed.

    The file is fsynced before the rename and its directory after it; it gets mode 0o666 less the umask.
    A write that finds no room (ENOSPC, EDQUOT, EFBIG) raises `DiskFullError` naming `path`, with the
    temporary file removed and `path` untouched.
    """
    target = Path(path)
    try:
        with _atomic_temp(target) as tmp:
            yield tmp
    except (OSError, RuntimeError) as err:
        code = disk_full_errno(err)
        if code is None or isinstance(err, DiskFullError):
            raise
        raise DiskFullError(target, code) from err


@contextmanager
def _atomic_temp(target: Path) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(target)
    try:
        yield tmp
        mode = umask_mode()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
            if os.stat(fd).st_mode & 0o777 != mode:  # a writer that recreated the file
                os.chmod(tmp, mode)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        fsync_directory(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike[str], payload: Any, *, sort_keys: bool = True) -> None:
    """Write `payload` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=sort_keys) + "\n")
