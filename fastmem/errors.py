"""User-facing errors: one clear line on stderr and a non-zero exit, never a traceback.

Owns the error type that every stage raises for user mistakes (missing or corrupt data, bad flag
combinations, absent hardware) and the wrapper that turns it into an exit status for CLIs.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

EXIT_USER_ERROR = 2


class FastmemError(Exception):
    """A user mistake (bad input, bad flags, missing data or hardware), reported as one line."""


# The errors a write gets when the disk (or the user's quota, or RLIMIT_FSIZE) has no room left.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


class DiskFullError(FastmemError, OSError):
    """A write that found no room (ENOSPC, EDQUOT, EFBIG): a user error, and still an OSError for callers
    that treat every failed write alike (the embedding cache carries on without the entry)."""

    def __init__(self, path: str | os.PathLike[str], code: int) -> None:
        super().__init__(code, f"{path}: cannot write it: {os.strerror(code)} (is the disk full?); "
                               "the file it would have replaced, if any, is unchanged")
        self.path = str(path)

    def __str__(self) -> str:
        return str(self.strerror)


def disk_full_errno(err: BaseException) -> int | None:
    """The ENOSPC/EDQUOT/EFBIG errno behind `err` (itself or what it was raised from/during), else None.

    torch.save's zip writer reports a failed Python write as a RuntimeError raised during the OSError.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return current.errno
        current = current.__cause__ or current.__context__
    return None


def fail(message: str) -> NoReturn:
    """Raise a FastmemError with the given one-line message."""
    raise FastmemError(message)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run a CLI main function; user errors print 'fastmem: error: ...' and exit with status 2.

    (CPython ignores SIGXFSZ at start-up, so a write past RLIMIT_FSIZE fails with EFBIG — reported as a
    full disk, `DiskFullError` — rather than killing the process.)
    """
    try:
        status = main(argv)
    except FastmemError as err:
        print(f"fastmem: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("fastmem: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(status or 0))
