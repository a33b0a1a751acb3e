"""The training stage: `python -m fastmem.train` (loop.py), with the mechanisms some experiments add
(mixing.py: mixup/cutmix for I; reinit.py: start from trained weights with parts reset, for J)."""

from fastmem.train.build import Run, build_run, validate
from fastmem.train.loop import cli, main, train, train_step

__all__ = ["Run", "build_run", "cli", "main", "train", "train_step", "validate"]
