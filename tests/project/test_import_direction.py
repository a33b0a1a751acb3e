"""Imports run one way: data ← pipelines ← run ← train/probe ← experiments/report (and kernels, models below).

Every import of a `fastmem` module in the source tree, lazy ones inside functions included, is read
from the AST and checked against the stages each stage may use. A new upward import fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Source folder → the package it installs as (setup.py's package_dir).
ROOTS = {"fastmem": "fastmem", "pipelines": "fastmem.pipelines", "kernels": "fastmem.kernels"}
BASE = {"errors", "io_utils"}
# Stage → the stages it may import (itself always). A stage is the first name below `fastmem`.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "io_utils": {"errors"},
    "cpu_precision": BASE | {"models"},  # measures the cpu scale's own model
    "runtime": BASE | {"cpu_precision"},
    "distributed": BASE,
    "data": BASE,
    "models": BASE,
    "kernels": BASE,
    "pipelines": BASE | {"data"},
    "run": BASE | {"data", "pipelines", "models", "kernels", "runtime", "distributed"},
    "probe": BASE | {"data", "pipelines", "models", "kernels", "runtime", "distributed", "run"},
    "train": BASE | {"data", "pipelines", "models", "kernels", "runtime", "distributed", "run", "probe"},
    "report": BASE | {"run"},
    "experiments": BASE | {"data", "pipelines", "models", "kernels", "runtime", "cpu_precision", "distributed", "run",
                           "probe", "train", "report"},
    "demo": {"experiments"},  # the `python -m fastmem.demo` entry point
    "__init__": set(),
}


def module_name(path: Path) -> str:
    """The dotted module a source file installs as."""
    rel = path.relative_to(REPO)
    parts = [ROOTS[rel.parts[0]], *rel.with_suffix("").parts[1:]]
    return ".".join(parts).removesuffix(".__init__")


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every fastmem module `source` imports (absolute or relative, at any depth of the code)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from fastmem import train`
    return {name for name in found if name == "fastmem" or name.startswith("fastmem.")}


def stage_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports of `module` that point up (or sideways) the stage order."""
    stage = stage_of(module)
    allowed = ALLOWED[stage] | {stage}
    bad = []
    for target in sorted(imported_modules(source, module, is_package)):
        target_stage = stage_of(target)
        if target_stage != "__init__" and target_stage not in allowed and target_stage in ALLOWED:
            bad.append(f"{module} imports {target} ({stage} may import {', '.join(sorted(allowed))})")
    return bad


def source_files() -> list[Path]:
    return sorted(p for root in ROOTS for p in (REPO / root).rglob("*.py"))


def test_every_source_file_belongs_to_a_known_stage() -> None:
    unknown = sorted({stage_of(module_name(p)) for p in source_files()} - set(ALLOWED))
    assert not unknown, f"stages missing from ALLOWED: {unknown}"


def test_imports_run_one_way() -> None:
    bad = [v for p in source_files() for v in violations(p.read_text(), module_name(p), p.name == "__init__.py")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(("module", "source"), [
    ("fastmem.data.iid_views", "from fastmem.pipelines.view_pool import shown_pool_rows"),
    ("fastmem.pipelines.backends.device", "def f():\n    from fastmem.train import loop\n"),
    ("fastmem.pipelines.backends.base", "from ...probe import probe_knn"),
    ("fastmem.run.config", "import fastmem.experiments.sweep"),
    ("fastmem.kernels.vote", "from fastmem import train"),
])
def test_an_upward_import_is_caught(module: str, source: str) -> None:
    assert violations(source, module), f"{source!r} in {module} should be refused"


def test_relative_imports_resolve_to_their_package() -> None:
    assert imported_modules("from .extract import x", "fastmem.probe.cache", False) >= {"fastmem.probe.extract"}
    assert imported_modules("from . import cache", "fastmem.probe", True) >= {"fastmem.probe.cache"}
