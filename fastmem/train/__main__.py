"""`python -m fastmem.train`: see fastmem/train/loop.py."""

from fastmem.train.loop import cli

if __name__ == "__main__":
    cli()
