"""The layer-wise k-NN probe: embed clean images at every probe point, classify test by train.

Per PROTOCOL.md: eval mode, no augmentation, reference = the training split with TRUE labels,
queries = the test split, cosine k-NN with k = 20 and an unweighted majority vote.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from fastmem.kernels import knn_classify
from fastmem.models import EncoderProjector
from fastmem.runtime import autocast


@torch.no_grad()
def extract_embeddings(
    model: EncoderProjector,
    images: np.ndarray,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    batch_size: int = 1024,
    channels_last: bool = True,
) -> OrderedDict[str, torch.Tensor]:
    """Every probe point's pooled embedding for uint8 NHWC `images`, float32 on `device`."""
    was_training = model.training
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    chunks: OrderedDict[str, list[torch.Tensor]] = OrderedDict((name, []) for name in model.probe_points)
    try:
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).to(device).permute(0, 3, 1, 2)
            batch = batch.float().div_(255).contiguous(memory_format=memory_format)
            with autocast(device, dtype):
                probes = model.forward_probes(batch)
            for name, value in probes.items():
                chunks[name].append(value.float())
    finally:
        model.train(was_training)
    return OrderedDict((name, torch.cat(parts)) for name, parts in chunks.items())


def probe_knn(
    model: EncoderProjector,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    k: int = 20,
    vote: str = "majority",
    num_classes: int | None = None,
) -> OrderedDict[str, float]:
    """k-NN accuracy (0–1) against the true labels at every probe point, in probe order."""
    reference = extract_embeddings(model, train_images, device=device, dtype=dtype)
    queries = extract_embeddings(model, test_images, device=device, dtype=dtype)
    ref_labels = torch.as_tensor(train_labels, dtype=torch.int64, device=device)
    truth = torch.as_tensor(test_labels, dtype=torch.int64, device=device)
    accuracy: OrderedDict[str, float] = OrderedDict()
    for name in model.probe_points:
        predicted = knn_classify(reference[name], ref_labels, queries[name], k=k, vote=vote, num_classes=num_classes)
        accuracy[name] = float((predicted == truth).float().mean())
    return accuracy
