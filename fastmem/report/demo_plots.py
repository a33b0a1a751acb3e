"""Plots of run metrics (PNG, matplotlib's Agg backend): per-layer k-NN and label fit over training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def knn_layers(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Probe-point names found in metrics records, in probe order."""
    for record in records:
        names = [key[4:] for key in record if key.startswith("knn/")]
        if names:
            return names
    return []


def probe_records(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records that carry a k-NN probe, by epoch."""
    return [r for r in records if any(key.startswith("knn/") for key in r)]


def plot_benign_vs_malign(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str) -> Path:
    """Three panels: final per-layer k-NN per run (with the untrained net), k-NN of each layer over
    epochs, and the random-label fit over epochs."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    first = next(iter(runs.values()))
    layers = knn_layers(first)
    untrained = probe_records(first)[0]
    axes[0].plot(layers, [100 * untrained[f"knn/{n}"] for n in layers], "k--", marker="o", label="untrained (epoch 0)")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, (label, records) in zip(colours, runs.items()):
        final = probe_records(records)[-1]
        axes[0].plot(layers, [100 * final[f"knn/{n}"] for n in layers], marker="o", color=colour,
                     label=f"{label} (epoch {final['epoch']})")
        probed = probe_records(records)
        for style, layer in zip(("-", "--", ":", "-."), dict.fromkeys((layers[-1], layers[-2], "h", layers[min(2, len(layers) - 1)]))):
            axes[1].plot([r["epoch"] for r in probed], [100 * r[f"knn/{layer}"] for r in probed], style,
                         color=colour, label=f"{label}: {layer}")
        trained = [r for r in records if "train_acc_random" in r]
        axes[2].plot([r["epoch"] for r in trained], [100 * r["train_acc_random"] for r in trained], color=colour, label=label)
    axes[0].set(title="k-NN accuracy (true labels) per layer", xlabel="probe point", ylabel="k-NN accuracy (%)")
    axes[0].tick_params(axis="x", rotation=30)
    axes[1].set(title="k-NN accuracy over training", xlabel="epoch", ylabel="k-NN accuracy (%)")
    axes[2].set(title="fit of the random training labels", xlabel="epoch", ylabel="train accuracy on random labels (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
