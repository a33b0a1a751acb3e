"""The package layout: pipelines/ and kernels/ import as fastmem.pipelines / fastmem.kernels, installed
editable (this checkout) and as a regular wheel, never as bare top-level names."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO

PROBE = "import fastmem.pipelines as p, fastmem.kernels as k; print(p.__file__); print(k.__file__)"


def test_editable_install_maps_pipelines_and_kernels_into_fastmem(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(REPO / "pipelines" / "__init__.py"), str(REPO / "kernels" / "__init__.py")]


def test_regular_wheel_ships_fastmem_pipelines_and_kernels(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("fastmem-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastmem/pipelines/__init__.py" in names and "fastmem/kernels/__init__.py" in names
    assert not any(n.startswith(("pipelines/", "kernels/")) for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(site / "fastmem" / "pipelines" / "__init__.py"), str(site / "fastmem" / "kernels" / "__init__.py")]
