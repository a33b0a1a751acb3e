"""The layer-wise k-NN probe: extract → cache → classify (PROTOCOL.md).

Eval mode, no augmentation; reference = the training images with their TRUE labels, queries = the
test images; cosine k-NN (k = DEFAULT_K, majority vote by default; fastmem/kernels/vote.py) at every probe point.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from fastmem.distributed import is_main_rank
from fastmem.kernels import DEFAULT_K, DEFAULT_TEMPERATURE, knn_classify
from fastmem.models import EncoderProjector
from fastmem.runtime import EXTRACT_BACKENDS

from .cache import CacheKey, EmbeddingCache, data_digest, state_digest
from .extract import Embedding, extract_embeddings, reduction_name
from .sharded import extract_embeddings_sharded, knn_classify_sharded, layers_missing_anywhere
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
    batch_size: int = 1024,
    forward: ProbeForward | None = None,
    distributed: bool = False,
) -> OrderedDict[str, Embedding]:
    """Embeddings of one split at `layers`, from the cache where present, extracted (and cached) otherwise.

    `distributed`: every torchrun rank calls this; each extracts its share and all get the whole.
    """
    # Autocast precision and TensorRT engines round differently: each gets its own cache entries.
    precision = "" if dtype is None else "-" + str(dtype).removeprefix("torch.")
    reduction = reduction_name(project_dim, 0) + precision + ("-trt" if forward is not None else "")
    found: dict[str, Embedding] = {}
    keys: dict[str, CacheKey] = {}
    if cache is not None:
        weights = weights or state_digest(model)
        data = data_digest(images, labels)
        for layer in layers:
            keys[layer] = CacheKey(weights, data, split, layer, reduction)
            hit = cache.get(keys[layer])
            if hit is not None:
                found[layer] = hit
    missing = tuple(layer for layer in layers if layer not in found)
    if distributed:
        missing = layers_missing_anywhere(missing, layers)
    if missing:
        extract = extract_embeddings_sharded if distributed else extract_embeddings
        fresh = extract(model, images, device=device, dtype=dtype, layers=missing, project_dim=project_dim,
                        batch_size=batch_size, forward=forward)
        for layer, embedding in fresh.items():
            if cache is not None and (not distributed or is_main_rank()):
                cache.put(keys[layer], embedding)
            found[layer] = embedding
    return OrderedDict((layer, found[layer]) for layer in layers)


def probe_knn(
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
) -> OrderedDict[str, float]:
    """k-NN accuracy (0–1) against the true labels at every requested probe point, in probe order.

    `distributed`: every torchrun rank calls this with the same inputs; extraction and queries are
    split across ranks (sharded.py) and every rank returns the single-process result exactly.
    `extract_backend` 'trt' embeds with a TensorRT engine cached in `engine_dir` (trt_extract.py).
    """
    wanted = tuple(layers or model.probe_points)
    weights = state_digest(model) if cache is not None or extract_backend != "eager" else None
    height, width, channels = train_images.shape[1:]
    forward = probe_forward(model, extract_backend, device=device, dtype=dtype, sample_shape=(channels, height, width),
                            max_batch=extract_batch_size, engine_dir=engine_dir, weights=weights,
                            write_cache=not distributed or is_main_rank())
    common = dict(device=device, dtype=dtype, cache=cache, weights=weights, project_dim=project_dim,
                  batch_size=extract_batch_size, forward=forward, distributed=distributed)
    reference = embed_split(model, train_images, train_labels, "train", wanted, **common)
    queries = embed_split(model, test_images, test_labels, "test", wanted, **common)
    truth = torch.as_tensor(np.asarray(test_labels), dtype=torch.int64)
    classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    accuracy: OrderedDict[str, float] = OrderedDict()
    classify = knn_classify_sharded if distributed else knn_classify
    for layer in wanted:
        predicted = classify(
            reference[layer].vectors, torch.as_tensor(np.asarray(train_labels)),
            queries[layer].vectors, k=k, vote=vote, temperature=temperature,
            num_classes=classes, device=device, backend=knn_backend,
        )
        accuracy[layer] = float((predicted.cpu() == truth).float().mean())
    return accuracy


__all__ = ["EXTRACT_BACKENDS", "TRT_ENGINE_DIR", "CacheKey", "Embedding", "EmbeddingCache", "embed_split",
           "extract_embeddings", "probe_knn", "state_digest"]
