"""Stopping a training run on a signal: SIGINT (Ctrl-C), SIGTERM and SIGUSR1 (Slurm's warning before a time limit).

The first signal only asks the trainer to stop: it finishes the optimizer step in flight, writes a
checkpoint at that step, closes the loader and exits with `128 + signal number` (130 for SIGINT, 143
for SIGTERM, 138 for SIGUSR1) after one line on stderr. A second signal aborts at once: the exit code
of that signal, no new checkpoint; checkpoints are written through a temporary file and a rename,
so the previous one stays intact.

The trainer looks at the request after every optimizer step (the checkpoint then holds the step and
the partial epoch's accumulators) and after each epoch's record (a signal during a probe or the
logging: an ordinary checkpoint of that epoch, reported as its last step). A request that comes
during setup or the epoch-0 probe is honoured after the first step; one during the last epoch's probe
or final checkpoint lets the run finish normally (exit 0: nothing is left to save).

Handlers are installed only in single-process runs and from the main thread; under torchrun
(world > 1) a signal keeps its default effect (the last epoch checkpoint is what a resume gets).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by signal `signum`: 128 + its number."""
    return 128 + int(signum)


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint at (epoch, step)."""

    def __init__(self, signum: int, epoch: int, step: int, run_dir: str) -> None:
        self.signum, self.epoch, self.step, self.run_dir = int(signum), epoch, step, run_dir
        super().__init__(self.message)

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)

    @property
    def message(self) -> str:
        return (f"fastmem: interrupted at epoch {self.epoch}, step {self.step}; checkpoint written; "
                f"resume with --resume {self.run_dir}")


class StopSignals:
    """Context manager: while active, the first stop signal sets `requested`; a second one aborts.

    Inactive (`enabled=False`, or outside the main thread) it installs nothing and `requested` stays None.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested: int | None = None  # the signal number of the first stop signal
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signum
            return
        print(f"fastmem: {signal.Signals(signum).name} again; aborted without a new checkpoint "
              f"(the previous checkpoint is kept)", file=sys.stderr, flush=True)
        raise SystemExit(exit_code(signum))  # unwinds through atomic_path, which removes its temporary file

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
