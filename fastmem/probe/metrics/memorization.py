"""The `memorization` metric: how much of a run's random training labels a layer encodes.

Both columns score the training images against the labels the network trained on (`train_targets`:
RUN_DIR/labels.npz `targets`; the random labels of a memorization run), never the truth:
- `memo-knn@<k>`: leave-one-out k-NN. Each training image's k nearest *other* training images vote
  (majority or weighted, as the k-NN metric). One search at max(k) + 1, then each row drops itself:
  the entry with its own index where the list holds it — with duplicate images a copy may rank
  ahead of the image itself (equal similarity, smaller index), so the drop is by index, not by
  position —, else the last entry (the image ranked below max(k) + 1 others that tie with it).
  Duplicates of an image stay among its neighbours: they are other training samples.
- `memo-linear`: the training accuracy of a linear fit of the random labels (fastmem/probe/linear.py's
  solver on L2-normalised rows) at one fixed λ (`MetricOptions.memorization_l2`, default 1e-5): the
  probe's held-out choice of λ would pick on noise, since no λ predicts held-out random labels.
  A linear map fits random labels better the wider the layer is relative to the number of images,
  whatever the features: Gaussian rows scored 15 % (16-d), 21 % (64-d) and 83 % (512-d) with 2,000
  images and 10 classes (chance 11 %). Compare memo-linear with the same layer of an untrained network (or a
  random layer of its width), not with chance; memo-knn has no such width effect.
Each value carries `chance`: the largest share among the training labels (what always guessing the
commonest one reaches; ≥ 1/C, recorded too as `info['uniform']`), and the Wilson interval is over the
training images. A layer that is the one-hot random label scores 100 %; a random layer about chance (memo-linear: a narrow one).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from fastmem.errors import fail
from fastmem.kernels import knn_topk
from fastmem.kernels.vote import knn_vote_several_k

from ..linear import fit_linear_probe
from .base import LayerInputs, MetricOptions, MetricValue, as_float32, label_chance
from .knn import check_ks


def drop_self(similarities: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove each row's own index (row i is training image i) from its ranked (N, m) neighbour list,
    or the last entry where the list does not hold it: (N, m − 1), still ranked."""
    rows, width = indices.shape
    own = indices == torch.arange(rows, device=indices.device)[:, None]
    missing = ~own.any(dim=1)
    own[missing, width - 1] = True
    first = own.to(torch.int8).argmax(dim=1, keepdim=True)  # one entry per row: an index appears once in a list
    keep = torch.ones_like(own)
    keep.scatter_(1, first, False)
    return similarities[keep].view(rows, width - 1), indices[keep].view(rows, width - 1)


def leave_one_out_knn(train: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor, ks: tuple[int, ...],
                      num_classes: int, *, vote: str = "majority", temperature: float = 0.07,
                      device: torch.device | str | None = None, backend: str = "auto") -> dict[int, torch.Tensor]:
    """Leave-one-out k-NN prediction of every training row for every k (k → (N,) int64), one search."""
    count = len(train)
    if count < 2:
        fail(f"leave-one-out k-NN needs at least 2 training images, got {count}")
    labels = torch.as_tensor(np.asarray(targets)).to(torch.int64)
    similarities, indices = knn_topk(train, train, min(max(ks) + 1, count), device=device, backend=backend)
    similarities, indices = drop_self(similarities, indices)
    return knn_vote_several_k(similarities, indices, labels, num_classes, ks, vote, temperature)


def linear_fit_accuracy_predictions(train: np.ndarray, targets: np.ndarray, num_classes: int, *, l2: float,
                                    threads: int = 1) -> tuple[np.ndarray, dict[str, object]]:
    """Predictions of a linear fit of `targets` on the training rows themselves (one λ, no held-out split)."""
    probe = fit_linear_probe(train, targets, num_classes, l2_grid=(l2,), threads=threads)
    info = probe.info()
    return probe.predict(train), {key: info[key] for key in ("l2", "sklearn_C", "iterations", "converged", "features")}


class MemorizationMetric:
    """Leave-one-out k-NN and linear-fit accuracy of the training images against their random labels."""

    name = "memorization"
    needs = frozenset({"train_targets"})

    def columns(self, options: MetricOptions) -> tuple[str, ...]:
        return (*(f"memo-knn@{k}" for k in check_ks(options.k)), "memo-linear")

    def evaluate(self, inputs: LayerInputs, options: MetricOptions) -> OrderedDict[str, MetricValue]:
        assert inputs.train is not None and inputs.train_targets is not None
        targets = np.asarray(inputs.train_targets).astype(np.int64)
        chance, uniform = label_chance(targets, inputs.num_classes)
        ks = check_ks(options.k)
        predicted = leave_one_out_knn(inputs.train, targets, ks, inputs.num_classes, vote=options.vote,
                                      temperature=options.temperature, device=options.device,
                                      backend=options.knn_backend)
        columns: OrderedDict[str, MetricValue] = OrderedDict()
        for k in ks:
            columns[f"memo-knn@{k}"] = MetricValue.from_predictions(
                predicted[k], targets, chance=chance, info={"k": k, "vote": options.vote, "uniform": uniform,
                                                            "leave_one_out": True})
        fitted, info = linear_fit_accuracy_predictions(as_float32(inputs.train), targets, inputs.num_classes,
                                                       l2=options.memorization_l2, threads=options.threads)
        columns["memo-linear"] = MetricValue.from_predictions(fitted, targets, chance=chance,
                                                              info={**info, "uniform": uniform})
        return columns
