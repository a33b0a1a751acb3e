"""The probe as a library: any model, any data, any registered metric → a per-layer report.

`probe_model(model, layers, train_images, train_labels, test_images, test_labels, metrics=("knn",), k=(20,))`
embeds the layers (extract → cache, the same machinery as a run's probe: eval mode, pooled, L2-normalised,
float16 rows) and runs each metric of fastmem.probe.metrics on them. `embed_inputs` + `evaluate_embeddings`
are the two halves, used as well by `python -m fastmem.probe RUN_DIR --metrics ...` (cli_metrics.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastmem.distributed import is_main_rank
from fastmem.errors import fail
from fastmem.kernels import DEFAULT_K, DEFAULT_TEMPERATURE, HOST_CHUNK_BYTES
from fastmem.runtime import resolve_device, resolve_precision

from .any_model import as_probe_model
from .cache import EmbeddingCache, state_digest
from .extract import Embedding
from .images import as_uint8_nhwc
from .metrics import LayerInputs, MetricOptions, MetricValue, ProbeMetric, evaluate_layer, needed, resolve_metrics
from .metrics.knn import check_ks
from .store import EmbeddingStore
from .trt_extract import probe_forward

Split = tuple[np.ndarray, np.ndarray]  # uint8 NHWC images, int64 labels


@dataclass(frozen=True)
class ProbeReport:
    """Per layer, per column (`knn@20`, `linear`, `memo-knn@20`, …) a MetricValue, with the set sizes."""

    values: OrderedDict[str, OrderedDict[str, MetricValue]]
    columns: tuple[str, ...]
    references: int | None = None
    queries: int | None = None
    train: int | None = None  # training images scored by memorization
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.values)

    def value(self, layer: str, column: str) -> MetricValue:
        return self.values[layer][column]

    def accuracy(self, column: str) -> OrderedDict[str, float]:
        """One column's value (0–1) per layer."""
        return OrderedDict((layer, columns[column].value) for layer, columns in self.values.items())

    def table(self) -> str:
        """The per-layer table: each cell the value and its 95 % Wilson interval, in percent."""
        width = max([len("layer"), *map(len, self.layers)]) + 2
        lines = [(f"{'layer':<{width}}" + "".join(f"{column:<26}" for column in self.columns)).rstrip()]
        for layer, columns in self.values.items():
            cells = []
            for column in self.columns:
                value, interval = columns[column], columns[column].interval
                cells.append(f"{100 * value.value:6.2f}% [{100 * interval.low:5.2f}, {100 * interval.high:5.2f}]".ljust(26))
            lines.append(f"{layer:<{width}}" + "".join(cells).rstrip())
        chance = next((v for columns in self.values.values() for v in columns.values() if v.chance is not None), None)
        if chance is not None:
            uniform = chance.info.get("uniform")
            lines.append(f"memo-*: scored against the training labels; chance {100 * chance.chance:.2f}% (the commonest "
                         f"label's share{f'; 1/C = {100 * uniform:.2f}%' if uniform else ''})")
        return "\n".join(lines)

    def to_dict(self, with_predictions: bool = False) -> dict[str, Any]:
        return {"columns": list(self.columns), "references": self.references, "queries": self.queries,
                "train": self.train, "seconds": self.seconds, **self.settings,
                "layers": {layer: {column: value.to_dict(with_predictions) for column, value in columns.items()}
                           for layer, columns in self.values.items()}}

    def csv_rows(self) -> list[list[Any]]:
        """A header and one row per (layer, column): value, interval, hits, n, chance."""
        rows: list[list[Any]] = [["layer", "metric", "value", "low_95", "high_95", "hits", "n", "chance"]]
        for layer, columns in self.values.items():
            for column, value in columns.items():
                interval = value.interval
                rows.append([layer, column, value.value, interval.low, interval.high, value.hits, value.n,
                             "" if value.chance is None else value.chance])
        return rows


def embed_inputs(
    model: nn.Module, layers: tuple[str, ...], needs: frozenset[str], *, reference: Split | None,
    queries: Split | None, train: Split | None, device: torch.device, dtype: torch.dtype | None,
    cache: EmbeddingCache | None = None, project_dim: int = 0, batch_size: int = 1024, distributed: bool = False,
    extract_backend: str = "eager", engine_dir: str | Path | None = None, host_chunk_bytes: int = HOST_CHUNK_BYTES,
) -> dict[str, OrderedDict[str, Embedding]]:
    """The embeddings the metrics need, by part ('reference', 'queries', 'train'): extracted or read from
    the cache under the keys a run's probe uses (split 'train' for reference and training images, 'test' for
    queries). `train` None: the training images are the reference (memorization reads those rows)."""
    from fastmem.probe import embed_split  # the package's, so that a patched extraction is seen

    wanted: dict[str, tuple[Split, str]] = {}
    if "reference" in needs or ("train_targets" in needs and train is None):
        if reference is None:
            fail("the metrics need reference images (train_images) and none were given")
        wanted["reference"] = (reference, "train")
    if "queries" in needs:
        if queries is None:
            fail("the metrics need query images (test_images) and none were given")
        wanted["queries"] = (queries, "test")
    if "train_targets" in needs and train is not None:
        wanted["train"] = (train, "train")
    first = next(iter(wanted.values()))[0][0]
    weights = state_digest(model) if cache is not None or extract_backend != "eager" else None
    height, width, channels = first.shape[1:]
    forward = probe_forward(model, extract_backend, device=device, dtype=dtype, sample_shape=(channels, height, width),
                            max_batch=batch_size, engine_dir=engine_dir, weights=weights,
                            write_cache=not distributed or is_main_rank())
    store = EmbeddingStore(cache, spill_bytes=host_chunk_bytes)
    common = dict(device=device, dtype=dtype, cache=cache, weights=weights, project_dim=project_dim,
                  batch_size=batch_size, forward=forward, distributed=distributed, store=store)
    embedded = {part: embed_split(model, images, labels, split, layers, **common)
                for part, ((images, labels), split) in wanted.items()}
    if "train_targets" in needs and "train" not in embedded:
        embedded["train"] = embedded["reference"]
    return embedded


def evaluate_embeddings(
    metrics: Sequence[ProbeMetric], layers: tuple[str, ...], embedded: dict[str, OrderedDict[str, Embedding]], *,
    num_classes: int, options: MetricOptions, reference_labels: np.ndarray | None = None,
    query_labels: np.ndarray | None = None, train_targets: np.ndarray | None = None,
) -> OrderedDict[str, OrderedDict[str, MetricValue]]:
    """Every metric's columns at every layer (layer → column → value)."""
    values: OrderedDict[str, OrderedDict[str, MetricValue]] = OrderedDict()
    for layer in layers:
        part = {name: embedded[name][layer].vectors if name in embedded else None
                for name in ("reference", "queries", "train")}
        inputs = LayerInputs(layer, num_classes, reference=part["reference"], reference_labels=reference_labels,
                             queries=part["queries"], query_labels=query_labels, train=part["train"],
                             train_targets=train_targets)
        values[layer] = evaluate_layer(metrics, inputs, options)
    return values


def probe_model(
    model: nn.Module | str,
    layers: Sequence[str] | str | None,
    train_images: Any,
    train_labels: Any = None,
    test_images: Any = None,
    test_labels: Any = None,
    *,
    metrics: Sequence[str] | str = ("knn",),
    k: int | Sequence[int] = (DEFAULT_K,),
    vote: str = "majority",
    temperature: float = DEFAULT_TEMPERATURE,
    train_targets: Any = None,
    num_classes: int | None = None,
    device: str | torch.device = "auto",
    precision: str | None = None,
    weights: str = "none",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize: int = 0,
    batch_size: int = 256,
    cache: EmbeddingCache | str | Path | None = None,
    project_dim: int = 0,
    knn_backend: str = "auto",
    linear_seed: int = 0,
    memorization_l2: float = MetricOptions.memorization_l2,
    threads: int = 1,
) -> ProbeReport:
    """Probe `layers` of any model with the registered `metrics`; a ProbeReport (table(), to_dict(), values).

    `model`: an nn.Module (a fastmem model's probe points, or any module's layers: graph nodes or module
    names, any_model.py) or 'torchvision:NAME' / 'timm:NAME' (with `weights`: none, a state-dict file or a
    pretrained name). Images: uint8 NHWC arrays with their labels, or map-style datasets of (image, label)
    (images.py). The train images are the reference, with their true labels; the test images the queries.
    `train_targets`: the labels a network trained on (random ones), for `memorization`. `k`: one or several
    (one neighbour search per layer serves them all). `precision`: autocast of the extraction (default fp32
    on a CPU, auto on CUDA). `mean`/`std`: input normalisation (a spec's own by default, none for a module).
    """
    chosen = resolve_metrics(metrics)
    needs = needed(chosen)
    ks = check_ks((k,) if isinstance(k, int) else tuple(k))
    target = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = resolve_precision(precision or ("fp32" if target.type == "cpu" else "auto"), target)
    probe, names = as_probe_model(model, layers, weights=weights, mean=mean, std=std, resize=resize)
    reference = as_uint8_nhwc(train_images, train_labels, "train_images")
    queries = None if test_images is None else as_uint8_nhwc(test_images, test_labels, "test_images")
    targets = None
    if "train_targets" in needs:
        if train_targets is None:
            fail("memorization needs the labels the network trained on: pass train_targets= (a run keeps them in labels.npz)")
        targets = np.asarray(train_targets).astype(np.int64)
        if targets.shape != reference[1].shape:
            fail(f"train_targets: {targets.shape[0]} labels for {reference[1].shape[0]} training images")
    classes = num_classes or 1 + max(int(part.max()) for part in
                                     [reference[1]] + ([queries[1]] if queries else []) + ([targets] if targets is not None else []))
    if isinstance(cache, str | Path):
        cache = EmbeddingCache(cache)
    options = MetricOptions(k=ks, vote=vote, temperature=temperature, device=target, knn_backend=knn_backend,
                            linear_seed=linear_seed, memorization_l2=memorization_l2, threads=threads)
    started = time.perf_counter()
    probe = probe.to(target)
    embedded = embed_inputs(probe, names, needs, reference=reference, queries=queries, train=None, device=target,
                            dtype=dtype, cache=cache, project_dim=project_dim, batch_size=batch_size)
    values = evaluate_embeddings(chosen, names, embedded, num_classes=classes, options=options,
                                 reference_labels=reference[1], query_labels=None if queries is None else queries[1],
                                 train_targets=targets)
    columns = tuple(c for metric in chosen for c in metric.columns(options))
    return ProbeReport(values, columns, references=len(reference[1]), queries=None if queries is None else len(queries[1]),
                       train=None if targets is None else len(targets), seconds=time.perf_counter() - started,
                       settings={"k": list(ks), "vote": vote, "metrics": [m.name for m in chosen]})
