"""User-facing errors: one clear line on stderr and a non-zero exit, never a traceback.

Owns the error type that every stage raises for user mistakes (missing or corrupt data, bad flag
combinations, absent hardware) and the wrapper that turns it into an exit status for CLIs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

EXIT_USER_ERROR = 2


class FastmemError(Exception):
    """A user mistake (bad input, bad flags, missing data or hardware), reported as one line."""


def fail(message: str) -> NoReturn:
    """Raise a FastmemError with the given one-line message."""
    raise FastmemError(message)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run a CLI main function; user errors print 'fastmem: error: ...' and exit with status 2."""
    try:
        status = main(argv)
    except FastmemError as err:
        print(f"fastmem: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("fastmem: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(status or 0))
