"""`python -m fastmem.demo` (`make demo`): the main job, defined in fastmem/experiments/demo.py."""

from fastmem.experiments.demo import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    cli()
