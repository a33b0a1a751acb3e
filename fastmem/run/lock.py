"""One process per run directory: an advisory lock on RUN_DIR/.lock, and the clean-up it makes safe.

`hold_run_lock(run_dir)` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on RUN_DIR/.lock (creating both if
needed) and writes the holder's pid into the file; a second fastmem process that asks for the same
directory gets one line naming that pid (a user error, exit status 2 through `fastmem.errors.run_cli`).
The kernel releases the lock when the holder's process ends, however it ends (SIGKILL included), so a
lock is never stale; the file itself stays (removing it would race with the next taker).

Within a process the lock is re-entrant: holding it again returns another handle on the same lock,
which stays held until every handle is released (or `release_run_lock` drops it, or the process exits).
`remove_stale_temps(run_dir)` deletes the temporary files interrupted atomic writes left behind; it
refuses to run unless this process holds the directory's lock (no writer can be mid-write then).
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from fastmem.errors import fail
from fastmem.io_utils import is_fastmem_temp

LOCK_NAME = ".lock"
DEFAULT_HINT = "wait for it or choose another --out"


@dataclass
class _Held:
    fd: int
    pid: int
    count: int


_HELD: dict[str, _Held] = {}  # realpath of the directory → this process's lock on it


def _key(run_dir: Path) -> str:
    return os.path.realpath(run_dir)


class RunLock:
    """A handle on a held run-directory lock; `release()` (or leaving its `with` block) lets go of it."""

    def __init__(self, run_dir: Path, key: str) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self._key = key
        self._released = False

    @property
    def held(self) -> bool:
        return not self._released and self._key in _HELD

    def release(self) -> None:
        """Drop this handle (idempotent); the lock goes when the process's last handle on it does."""
        if self._released:
            return
        self._released = True
        held = _HELD.get(self._key)
        if held is not None:
            held.count -= 1
            if held.count <= 0:
                _drop(self._key)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _drop(key: str) -> None:
    held = _HELD.pop(key, None)
    if held is not None and held.pid == os.getpid():
        os.close(held.fd)  # closing the last descriptor releases the flock


def _holder_pid(fd: int) -> str:
    """The pid the holder wrote into the lock file ('unknown' if it has not written it yet)."""
    for _ in range(20):  # the holder writes its pid right after taking the lock
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.05)
    return "unknown"


def hold_run_lock(run_dir: str | os.PathLike[str], *, hint: str = DEFAULT_HINT) -> RunLock:
    """Take RUN_DIR's lock for this process (creating the directory if needed) and return a handle.

    If another process holds it, fail with one line naming its pid: `<dir> is in use by another
    fastmem process (pid N); <hint>`. Keep the handle (or call nothing): the lock lasts until it is
    released or the process exits.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = _key(run_dir)
    held = _HELD.get(key)
    if held is not None and held.pid != os.getpid():  # inherited through fork: not this process's lock
        _HELD.pop(key)
        held = None
    if held is not None:
        held.count += 1
        return RunLock(run_dir, key)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder_pid(fd)
        os.close(fd)
        fail(f"{run_dir} is in use by another fastmem process (pid {pid}); {hint}")
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = _Held(fd, os.getpid(), 1)
    return RunLock(run_dir, key)


def is_run_lock_held(run_dir: str | os.PathLike[str]) -> bool:
    """Whether this process holds RUN_DIR's lock."""
    held = _HELD.get(_key(Path(run_dir)))
    return held is not None and held.pid == os.getpid()


def release_run_lock(run_dir: str | os.PathLike[str]) -> None:
    """Let go of RUN_DIR's lock now, whatever handles are out (a no-op if this process does not hold it)."""
    _drop(_key(Path(run_dir)))


def remove_stale_temps(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files of interrupted fastmem writes under RUN_DIR; returns what was removed.

    Only names fastmem's atomic writers produce are touched (`fastmem.io_utils.is_fastmem_temp`), and only
    while this process holds RUN_DIR's lock. Subfolders with a lock of their own (the run directories in a
    sweep folder) are left to their own holders.
    """
    run_dir = Path(run_dir)
    if not is_run_lock_held(run_dir):
        raise RuntimeError(f"remove_stale_temps({run_dir}): take hold_run_lock({run_dir}) first")
    removed: list[Path] = []
    for root, dirs, files in os.walk(run_dir):
        dirs[:] = [d for d in dirs if not (Path(root, d) / LOCK_NAME).exists()]
        for name in files:
            if is_fastmem_temp(name):
                path = Path(root, name)
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                removed.append(path)
    return sorted(removed)
