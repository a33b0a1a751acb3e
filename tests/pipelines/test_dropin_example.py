"""The README's drop-in example runs as written (read from README.md, so the two cannot drift)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def _readme_example() -> str:
    """The python block that follows the drop-in marker in README.md."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- dropin-example -->", 1)[1]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


EXAMPLE = _readme_example()


def test_the_readme_dropin_example_runs_as_written() -> None:
    env = {**os.environ, "FASTMEM_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # one thread each, like the trainer tests
    result = subprocess.run([sys.executable, "-c", EXAMPLE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 0", "epoch 1"]
    assert float(lines[-1].split()[-1]) < 2.0  # learning from augmented Fashion-MNIST: below chance's ln(10) ≈ 2.3
