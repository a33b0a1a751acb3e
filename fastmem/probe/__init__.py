"""The layer-wise k-NN probe: extract → cache → classify (PROTOCOL.md).

Eval mode, no augmentation; reference = the training images with their TRUE labels, queries = the
test images; cosine k-NN (k = DEFAULT_K, majority vote by default; fastmem/kernels/vote.py) at every probe point.
The probe as a library for any model, data and metric: `probe_model` (library.py), metric plugins in
`METRICS` (metrics/: knn at several k from one search, linear, memorization).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmem.distributed import is_main_rank
from fastmem.kernels import DEFAULT_K, DEFAULT_TEMPERATURE, HOST_CHUNK_BYTES, knn_classify
from fastmem.models import EncoderProjector
from fastmem.runtime import EXTRACT_BACKENDS

from .cache import CACHE_FORMAT_VERSION, CacheKey, EmbeddingCache, EmbeddingCacheWarning, data_digest, state_digest
from .extract import EXTRACTION_VERSION, Embedding, ExtractionConfig, MemorySink, extract_embeddings
from .library import ProbeReport, probe_model
from .metrics import METRICS, MetricOptions, MetricValue, ProbeMetric, register_metric
from .sharded import extract_embeddings_sharded, knn_classify_sharded, layers_missing_anywhere
from .store import EmbeddingStore
from .stream import SPILL_BYTES, EmbeddingWriteError
from .trt_extract import TRT_ENGINE_DIR, ProbeForward, probe_forward


def embed_split(
    model: EncoderProjector,
    images: np.ndarray,
    labels: np.ndarray,
    split: str,
    layers: tuple[str, ...],
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    cache: EmbeddingCache | None,
    weights: str | None,
    project_dim: int,
    project_seed: int = 0,
    channels_last: bool = True,
    batch_size: int = 1024,
    forward: ProbeForward | None = None,
    distributed: bool = False,
    store: EmbeddingStore | None = None,
) -> OrderedDict[str, Embedding]:
    """Embeddings of one split at `layers`, from the cache where present, extracted (and cached) otherwise.

    Extraction streams into the cache (or, without one, keeps small layers in RAM and spills large
    ones to a temp file): peak memory is a batch, not N × D. `store` (one per probe) decides where
    fresh rows go and warns once if the disk refuses them. `distributed`: every torchrun rank calls
    this; each extracts its share and all get the whole, in memory (rank 0 writes the cache).
    """
    config = ExtractionConfig.resolve(dtype=dtype, channels_last=channels_last, project_dim=project_dim,
                                      project_seed=project_seed, trt=forward is not None, batch_size=batch_size,
                                      device=device)
    store = store if store is not None else EmbeddingStore(cache)
    found: dict[str, Embedding] = {}
    keys: dict[str, CacheKey] = {}
    if cache is not None:
        weights = weights or state_digest(model)
        data = data_digest(images, labels)
        for layer in layers:
            keys[layer] = CacheKey(weights, data, split, layer, config.reduction(), config.digest())
            hit = cache.get(keys[layer])
            if hit is not None:
                found[layer] = hit
    missing = tuple(layer for layer in layers if layer not in found)
    if distributed:
        missing = layers_missing_anywhere(missing, layers)
    if missing:
        options = dict(device=device, dtype=dtype, layers=missing, project_dim=project_dim, project_seed=project_seed,
                       channels_last=channels_last, batch_size=batch_size, forward=forward)
        if distributed:
            fresh = extract_embeddings_sharded(model, images, **options)
            if cache is not None and is_main_rank():
                for layer, embedding in fresh.items():
                    store.put(keys[layer], embedding)
        else:
            try:
                fresh = extract_embeddings(model, images, sink=store.sink(keys, config), **options)
            except EmbeddingWriteError as error:
                store.failed(error)
                fresh = extract_embeddings(model, images, sink=MemorySink(), **options)
        found.update(fresh)
    return OrderedDict((layer, found[layer]) for layer in layers)


@dataclass(frozen=True)
class ProbeResult:
    """One probe's k-NN predictions per probe point (class per query), with the queries' true labels."""

    predictions: OrderedDict[str, np.ndarray]
    truth: np.ndarray

    def correct(self, layer: str) -> np.ndarray:
        """Per-query correctness (bool) at one probe point."""
        return self.predictions[layer] == self.truth

    def accuracy(self) -> OrderedDict[str, float]:
        """k-NN accuracy (0–1) per probe point, in probe order."""
        return OrderedDict((layer, float(self.correct(layer).mean())) for layer in self.predictions)


def probe_predictions(
    model: EncoderProjector,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    k: int = DEFAULT_K,
    vote: str = "majority",
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    layers: tuple[str, ...] | None = None,
    cache: EmbeddingCache | None = None,
    project_dim: int = 0,
    knn_backend: str = "auto",
    extract_batch_size: int = 1024,
    distributed: bool = False,
    extract_backend: str = "eager",
    engine_dir: str | Path | None = None,
    host_chunk_bytes: int = HOST_CHUNK_BYTES,
) -> ProbeResult:
    """The k-NN prediction of every query at every requested probe point (reference labels: the true ones).

    `distributed`: every torchrun rank calls this with the same inputs; extraction and queries are
    split across ranks (sharded.py) and every rank returns the single-process result exactly.
    `extract_backend` 'trt' embeds with a TensorRT engine cached in `engine_dir` (trt_extract.py).
    `host_chunk_bytes` bounds host memory: a larger uncached layer is spilled to a temp file, and the
    k-NN reads references and queries in blocks of at most this many fp32 bytes.
    """
    wanted = tuple(layers or model.probe_points)
    weights = state_digest(model) if cache is not None or extract_backend != "eager" else None
    height, width, channels = train_images.shape[1:]
    forward = probe_forward(model, extract_backend, device=device, dtype=dtype, sample_shape=(channels, height, width),
                            max_batch=extract_batch_size, engine_dir=engine_dir, weights=weights,
                            write_cache=not distributed or is_main_rank())
    store = EmbeddingStore(cache, spill_bytes=host_chunk_bytes)
    common = dict(device=device, dtype=dtype, cache=cache, weights=weights, project_dim=project_dim,
                  batch_size=extract_batch_size, forward=forward, distributed=distributed, store=store)
    reference = embed_split(model, train_images, train_labels, "train", wanted, **common)
    queries = embed_split(model, test_images, test_labels, "test", wanted, **common)
    classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    predictions: OrderedDict[str, np.ndarray] = OrderedDict()
    classify = knn_classify_sharded if distributed else knn_classify
    for layer in wanted:
        predicted = classify(
            reference[layer].vectors, torch.as_tensor(np.asarray(train_labels)),
            queries[layer].vectors, k=k, vote=vote, temperature=temperature,
            num_classes=classes, device=device, backend=knn_backend, chunk_bytes=host_chunk_bytes,
        )
        predictions[layer] = predicted.cpu().numpy().astype(np.int64)
    return ProbeResult(predictions, np.asarray(test_labels).astype(np.int64))


def probe_knn(model: EncoderProjector, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
              test_labels: np.ndarray, *, device: torch.device, k: int = DEFAULT_K,
              temperature: float = DEFAULT_TEMPERATURE, **options: Any) -> OrderedDict[str, float]:
    """k-NN accuracy (0–1) against the true labels at every requested probe point, in probe order
    (probe_predictions' options)."""
    return probe_predictions(model, train_images, train_labels, test_images, test_labels, device=device, k=k,
                             temperature=temperature, **options).accuracy()


__all__ = ["CACHE_FORMAT_VERSION", "EXTRACTION_VERSION", "EXTRACT_BACKENDS", "METRICS", "SPILL_BYTES", "TRT_ENGINE_DIR",
           "CacheKey", "Embedding", "EmbeddingCache", "EmbeddingCacheWarning", "EmbeddingStore", "ExtractionConfig",
           "MetricOptions", "MetricValue", "ProbeMetric", "ProbeReport", "ProbeResult", "embed_split", "extract_embeddings",
           "probe_knn", "probe_model", "probe_predictions", "register_metric", "state_digest"]
