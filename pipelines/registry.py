"""The pipeline registry: every backend declared once, with what it executes and the options it takes.

Owns `PipelineEntry` (module and factory, who executes the views and so which ops and augment kinds
it runs, whether it shows i.i.d. view pools, the extra naming its optional dependency, its backend
options, a one-line help) and `check_pipeline`, the one capability check: the trainer's `validate()`
and `make_loader` call it before any data is read. Backends that run the shared executors execute
the ops executors/select.py can run (imported on first use); a backend with its own graph (dali)
declares its ops here. Nothing here imports a backend module or an optional dependency.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastmem.pipelines.params import AUGMENT_OPS, AugmentSpec

from fastmem.errors import fail

# The ops DALI's graph executes (backends/dali.py: reflect pad + slice + resize, flip, colour, grayscale).
DALI_OPS: tuple[str, ...] = ("pad_crop", "resized_crop", "flip", "color_jitter", "grayscale")


@dataclass(frozen=True)
class PipelineOption:
    """A backend-specific keyword of `make_loader`, passed through to the backend's factory."""

    name: str
    types: tuple[type, ...]  # accepted value types
    help: str
    source_suffix: str = ""  # a `source` path to a file ending so is this option's value (ffcv: ".beton")


@dataclass(frozen=True)
class PipelineEntry:
    """One backend: where it lives and what it can do."""

    module: str  # imported on first use
    factory: str  # class or function taking (images, targets, options, **backend options)
    help: str  # one line
    executor: str = "fastest"  # who executes the views: "fastest" / "reference" (executors/select.py) or "graph"
    graph_ops: tuple[str, ...] = ()  # the ops its own graph executes (executor == "graph")
    view_pool: bool = False  # shows i.i.d. views from a ViewPool (--iid-views)
    file_lists: bool = False  # takes image files (a FileDataset, an image folder) and decodes them itself
    extra: str = ""  # `pip install -e .[extra]` when an optional dependency is missing
    options: tuple[PipelineOption, ...] = ()

    @property
    def ops(self) -> frozenset[str]:
        """Every op this backend executes."""
        if self.executor == "graph":
            return frozenset(self.graph_ops)
        from fastmem.pipelines.executors.select import executor_ops  # numba and Triton: only when asked

        return executor_ops(self.executor)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The augment kinds it executes: those whose every op it executes."""
        ops = self.ops
        return tuple(kind for kind, needed in AUGMENT_OPS.items() if set(needed) <= ops)


_BETON_HELP = "an existing FFCV .beton to read (python -m fastmem.pipelines.ffcv write); also accepted as the source"
BACKENDS: dict[str, PipelineEntry] = {
    "device": PipelineEntry(
        "fastmem.pipelines.backends.device", "DeviceLoader", view_pool=True,
        help="dataset resident on the device, whole-batch fused augmentation (numba on CPU, Triton on CUDA)"),
    "torch": PipelineEntry(
        "fastmem.pipelines.backends.torch", "TorchLoader", executor="reference", view_pool=True,
        help="plain DataLoader baseline: the reference executor per sample, worker processes"),
    "dali": PipelineEntry(
        "fastmem.pipelines.backends.dali", "DaliLoader", executor="graph", graph_ops=DALI_OPS, file_lists=True,
        extra="dali", help="NVIDIA DALI graph fed the sampler's parameters; decodes image folders itself",
        options=(
            PipelineOption("image_size", (int,), "decode size of image files (a FileDataset or image folder source)"),
            PipelineOption("channels", (int,), "channels image files decode to: 1 or 3"),
            PipelineOption("num_threads", (int,), "DALI CPU threads (default: workers, else every core)"),
        )),
    "ffcv": PipelineEntry(
        "fastmem.pipelines.backends.ffcv", "FfcvLoader", extra="ffcv",
        help="FFCV decodes a .beton (given, or written from the arrays); the shared executors augment",
        options=(
            PipelineOption("beton", (str, os.PathLike), _BETON_HELP, source_suffix=".beton"),
            PipelineOption("jpeg_quality", (int,), "JPEG quality when writing arrays to a temporary .beton (0: raw)"),
            PipelineOption("batches_ahead", (int,), "batches FFCV decodes ahead of the consumer"),
        )),
}
PIPELINE_NAMES: tuple[str, ...] = tuple(BACKENDS)


def _entry(pipeline: str) -> PipelineEntry:
    if pipeline not in BACKENDS:
        fail(f"unknown pipeline {pipeline!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[pipeline]


def _either(names: list[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_pipeline(pipeline: str, spec: AugmentSpec | str | None = None, *, view_pool: bool = False) -> PipelineEntry:
    """The registry entry of `pipeline`; one line when it is unknown or cannot execute `spec` (or a view pool)."""
    entry = _entry(pipeline)
    if view_pool and not entry.view_pool:
        able = [name for name, e in BACKENDS.items() if e.view_pool]
        fail(f"--iid-views is supported by the {' and '.join(able)} pipelines, not {pipeline!r}")
    if spec is None:
        return entry
    spec = AugmentSpec.parse(spec)
    missing = [op for op in spec.ops if op not in entry.ops]
    if missing:
        able = [name for name, e in BACKENDS.items() if set(spec.ops) <= e.ops and (e.view_pool or not view_pool)]
        advice = f"use --pipeline {_either(able)}" if able else "no pipeline executes it"
        fail(f"the {pipeline} pipeline does not execute {spec} ({', '.join(missing)}); {advice}")
    return entry


def check_backend_options(pipeline: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The backend options checked against the entry's declared ones (name and type); one line otherwise."""
    entry = _entry(pipeline)
    declared = {option.name: option for option in entry.options}
    for name, value in options.items():
        if name not in declared:
            takes = f"it takes {', '.join(declared)}" if declared else "it takes no backend options"
            fail(f"the {pipeline} pipeline has no option {name!r}; {takes}")
        option = declared[name]
        if (isinstance(value, bool) and bool not in option.types) or not isinstance(value, option.types):
            kinds = " or ".join(t.__name__ for t in option.types)
            fail(f"{pipeline} option {name}= must be {kinds}, got {type(value).__name__} {value!r}")
    return dict(options)


def source_option(pipeline: str, suffix: str) -> str | None:
    """The name of the option that a source file ending in `suffix` stands for, if the backend has one."""
    for option in _entry(pipeline).options:
        if option.source_suffix and suffix.lower() == option.source_suffix:
            return option.name
    return None


def load_factory(pipeline: str) -> Callable[..., Any]:
    """The factory of a registered backend, importing its module (and optional dependency) now."""
    entry = _entry(pipeline)
    try:
        module = importlib.import_module(entry.module)
    except ImportError as err:
        missing = getattr(err, "name", None) or str(err)
        if missing == entry.module:
            fail(f"pipeline {pipeline!r} is not part of this install ({entry.module} is missing)")
        hint = f"pip install -e .[{entry.extra}]" if entry.extra else "reinstall fastmem"
        fail(f"pipeline {pipeline!r} needs {missing!r}, which is not installed: {hint}")
    return getattr(module, entry.factory)
