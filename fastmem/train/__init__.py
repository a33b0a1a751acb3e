"""The training stage: `python -m fastmem.train` (loop.py), with the mechanisms some experiments add
(mixing.py: mixup/cutmix for I; reinit.py: start from trained weights with parts reset, for J)."""

from fastmem.train.loop import Run, build_run, cli, main, train, train_step, validate

__all__ = ["Run", "build_run", "cli", "main", "train", "train_step", "validate"]
