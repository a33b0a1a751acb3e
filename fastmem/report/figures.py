"""The report's figures (PNG via matplotlib's Agg backend), each readable without the text.

Every function takes the loaded runs of one sweep (`SweepRun`s) and writes one PNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fastmem.io_utils import atomic_path  # noqa: E402
from fastmem.run.metrics import RunRecords  # noqa: E402


@dataclass(frozen=True)
class SweepRun(RunRecords):
    """One variant of a sweep: its metrics records (the RunRecords views) and how the report shows it."""

    label: str = ""
    role: str = "run"
    value: float | None = None
    group: str = ""
    knobs: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)


def _colours(n: int) -> list[Any]:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def save_figure(fig: Any, path: Path, dpi: int = 100) -> Path:
    """Write a figure atomically (a full disk is one line and leaves the previous image) and close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    return save_figure(fig, path)


def _reference(runs: Sequence[SweepRun]) -> tuple[SweepRun | None, SweepRun | None]:
    """(the run whose epoch-0 probe is the untrained reference, the clean-label run)."""
    untrained = next((r for r in runs if r.role != "clean" and r.untrained), None)
    clean = next((r for r in runs if r.role == "clean" and r.probes), None)
    return untrained or clean, clean


def plot_knn_vs_epoch(runs: Sequence[SweepRun], path: Path, title: str) -> Path:
    """One panel per probe point: k-NN accuracy over epochs for each run, untrained and clean as references."""
    untrained, clean = _reference(runs)
    layers = next((r.layers for r in runs if r.layers), [])
    cols = min(4, max(1, len(layers)))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows + 0.6), squeeze=False)
    colours = _colours(len(runs))
    for ax, layer in zip(axes.flat, layers):
        for colour, run in zip(colours, runs):
            points = [(epoch, 100 * accuracy) for epoch, accuracy in run.knn_curve(layer)]
            if points and run.role != "clean":
                ax.plot(*zip(*points), marker=".", color=colour, label=run.label)
        if untrained is not None and untrained.untrained_knn(layer) is not None:
            ax.axhline(100 * untrained.untrained_knn(layer), color="black", ls="--", lw=1.2, label="untrained (epoch 0)")
        if clean is not None and clean.final_knn(layer) is not None:
            ax.axhline(100 * clean.final_knn(layer), color="grey", ls=":", lw=1.8, label="clean labels (final)")
        ax.set(title=layer, xlabel="epoch", ylabel="k-NN accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08 if rows == 1 else 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_final_per_layer(runs: Sequence[SweepRun], path: Path, title: str) -> Path:
    """Final k-NN accuracy per probe point, one line per run: the benign/malign picture."""
    untrained, clean = _reference(runs)
    fig, ax = plt.subplots(figsize=(9, 5))
    layers = next((r.layers for r in runs if r.layers), [])
    for colour, run in zip(_colours(len(runs)), runs):
        if not run.probes:
            continue
        style = {"color": "grey", "lw": 2.5, "ls": ":"} if run.role == "clean" else {"color": colour}
        ax.plot(run.layers, [100 * run.final_knn(n) for n in run.layers], marker="o",
                label=f"{run.label} (epoch {run.final_probe_epoch})", **style)
    if untrained is not None:
        ax.plot(layers, [100 * (untrained.untrained_knn(n) or math.nan) for n in layers], "k--", marker="x",
                label="untrained (epoch 0)")
    ax.set(title=title, xlabel="probe point (input → output)", ylabel="k-NN accuracy on true labels (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_fit_vs_epoch(runs: Sequence[SweepRun], path: Path, title: str) -> Path:
    """Random-label training accuracy over epochs for each run."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for colour, run in zip(_colours(len(runs)), runs):
        fit = run.fit_curve()
        if fit:
            ax.plot([e for e, _ in fit], [100 * f for _, f in fit], color=colour,
                    label=run.label, ls=":" if run.role == "clean" else "-")
    ax.set(title=title, xlabel="epoch", ylabel="train accuracy on the run's labels (%)", ylim=(0, 101))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_tradeoff(runs: Sequence[SweepRun], path: Path, title: str, layers: Sequence[str]) -> Path:
    """Memorization vs generalization: final random-label fit against final k-NN, one point per run."""
    untrained, _ = _reference(runs)
    fig, axes = plt.subplots(1, len(layers), figsize=(5.5 * len(layers), 4.6), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        for colour, run in zip(_colours(len(runs)), runs):
            fit, knn = run.final_fit, run.final_knn(layer)
            if fit is None or knn is None or run.role == "clean":
                continue
            ax.scatter([100 * fit], [100 * knn], color=colour, s=50, zorder=3)
            ax.annotate(run.label, (100 * fit, 100 * knn), fontsize=7, xytext=(4, 4), textcoords="offset points")
        if untrained is not None and untrained.untrained_knn(layer) is not None:
            ax.axhline(100 * untrained.untrained_knn(layer), color="black", ls="--", lw=1, label="untrained (epoch 0)")
            ax.legend(fontsize=8)
        ax.set(title=f"k-NN at {layer} vs fit", xlabel="fit of the random labels (train acc., %)",
               ylabel=f"k-NN accuracy at {layer} (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def plot_fit_vs_views(runs: Sequence[SweepRun], path: Path, title: str) -> Path:
    """E: final fit against the number of labelled views N·n (log scale)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = sorted((r.config.get("subset", 0) * (r.value or 1), 100 * r.final_fit, r.label)
                    for r in runs if r.final_fit is not None and r.role != "clean")
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        for x, y, label in points:
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(title=title, xlabel="random-labelled views N·n", ylabel="final fit of the view labels (%)", ylim=(0, 101))
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_capacity(runs: Sequence[SweepRun], path: Path, title: str, layers: Sequence[str]) -> Path:
    """F: one panel per axis (projector width, training images, encoder width): fit and k-NN against it."""
    groups = list(dict.fromkeys(r.group for r in runs if r.group))
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5.2 * max(1, len(groups)), 4.4), squeeze=False)
    for ax, group in zip(axes.flat, groups):
        members = sorted((r for r in runs if r.group == group and r.final_fit is not None), key=lambda r: r.value or 0)
        xs = [r.value or 0 for r in members]
        ax.plot(xs, [100 * r.final_fit for r in members], "k-o", label="fit of random labels")
        for layer in layers:
            ax.plot(xs, [100 * (r.final_knn(layer) or math.nan) for r in members], marker="s", label=f"k-NN {layer}")
        if xs and min(xs) > 0 and max(xs) / min(xs) > 8:
            ax.set_xscale("log")
        ax.set(title=group, xlabel=group, ylabel="%", ylim=(0, 101))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)
