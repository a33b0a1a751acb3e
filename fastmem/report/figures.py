"""The report's figures (PNG via matplotlib's Agg backend), each readable without the text.

Every function takes one sweep's variants (`VariantRuns`, fastmem/report/variants.py) and writes one PNG.
A variant's point is its mean over seeds; its error bar (or band) is the 95 % interval over the probe's
queries with one seed, ± the seeds' standard deviation with several, and then each seed's point is drawn too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fastmem.io_utils import atomic_path  # noqa: E402
from fastmem.report.cells import bounds  # noqa: E402
from fastmem.report.layers import distinct_layers  # noqa: E402
from fastmem.report.variants import SweepRun, VariantRuns, shared_untrained  # noqa: E402

__all__ = ["SweepRun", "VariantRuns", "plot_capacity", "plot_final_per_layer", "plot_fit_vs_epoch",
           "plot_fit_vs_views", "plot_knn_vs_epoch", "plot_lift_per_layer", "plot_tradeoff", "save_figure"]


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


def _layers(variants: Sequence[VariantRuns]) -> list[str]:
    """The probe points to draw, each distinct embedding once (h stands for the last stage: report/layers.py)."""
    return _distinct(next((v.layers for v in variants if v.layers), []))


def _distinct(layers: Sequence[str]) -> list[str]:
    return [name for name, _ in distinct_layers(layers)]


def _reference(variants: Sequence[VariantRuns]) -> tuple[VariantRuns | None, VariantRuns | None]:
    """(the variant whose epoch-0 probe is the untrained reference, when all variants share their untrained networks;
    the clean-label variant)."""
    clean = next((v for v in variants if v.role == "clean" and v.probed), None)
    if not shared_untrained(variants):
        return None, clean
    untrained = next((v for v in variants if v.role != "clean" and v.untrained_signature), None)
    return untrained or clean, clean


def _legend(fig: Any, ax: Any) -> None:
    """The legend inside the axes, or to their right (the figure widened) when it has many entries."""
    if len(ax.get_legend_handles_labels()[1]) <= 8:
        ax.legend(fontsize=8)
        return
    width, height = fig.get_size_inches()
    fig.set_size_inches(width + 3.5, height)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _errorbar(ax: Any, xs: Sequence[Any], entries: Sequence[dict[str, Any] | None], **style: Any) -> None:
    """Points at each entry's mean with its error bar; each seed's value as a faint dot when several seeds."""
    shown = [(x, b, e) for x, e in zip(xs, entries) for b in [bounds(e)] if b is not None]
    if not shown:
        return
    centres = [b[0] for _, b, _ in shown]
    bars = [[b[0] - b[1] for _, b, _ in shown], [b[2] - b[0] for _, b, _ in shown]]
    ax.errorbar([x for x, _, _ in shown], centres, yerr=bars, capsize=3, **style)
    seeds = [(x, 100 * p["value"]) for x, _, e in shown if len(e["per_seed"]) > 1 for p in e["per_seed"]]
    if seeds:
        ax.plot([x for x, _ in seeds], [y for _, y in seeds], ".", color=style.get("color", "black"), alpha=0.45,
                ms=5, zorder=1)


def _band(ax: Any, points: Sequence[tuple[int, float, float, float]], colour: Any, label: str, **style: Any) -> None:
    if not points:
        return
    epochs = [p[0] for p in points]
    ax.plot(epochs, [100 * p[1] for p in points], color=colour, label=label, **style)
    if any(p[3] > p[2] for p in points):
        ax.fill_between(epochs, [100 * p[2] for p in points], [100 * p[3] for p in points], color=colour, alpha=0.18,
                        lw=0)


def plot_knn_vs_epoch(variants: Sequence[VariantRuns], path: Path, title: str) -> Path:
    """One panel per probe point: k-NN accuracy over epochs per variant (band: 95 % interval or ± sd over seeds);
    the untrained network (when shared) and the clean-label run's final accuracy as references."""
    untrained, clean = _reference(variants)
    layers = _layers(variants)
    cols = min(4, max(1, len(layers)))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows + 0.6), squeeze=False)
    colours = _colours(len(variants))
    for ax, layer in zip(axes.flat, layers):
        for colour, variant in zip(colours, variants):
            if variant.role != "clean":
                _band(ax, variant.knn_band(layer), colour, variant.label, marker=".")
        reference = bounds(untrained.untrained(layer)) if untrained is not None else None
        if reference is not None:
            ax.axhline(reference[0], color="black", ls="--", lw=1.2, label="untrained (epoch 0)")
        final = bounds(clean.final(layer)) if clean is not None else None
        if final is not None:
            ax.axhline(final[0], color="grey", ls=":", lw=1.8, label="clean labels (final)")
        ax.set(title=layer, xlabel="epoch", ylabel="k-NN accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8,
               bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08 if rows == 1 else 0.05, 1, 1))
    return save_figure(fig, path)


def plot_final_per_layer(variants: Sequence[VariantRuns], path: Path, title: str) -> Path:
    """Final k-NN accuracy per probe point, one line per variant with error bars: the benign/malign picture.
    The untrained network is one black line when every variant shares it, else one dashed line per variant."""
    untrained, _ = _reference(variants)
    fig, ax = plt.subplots(figsize=(9, 5))
    layers = _layers(variants)
    untrained_lines: dict[tuple[Any, ...], tuple[Any, list[VariantRuns]]] = {}
    for colour, variant in zip(_colours(len(variants)), variants):
        if not variant.probed:
            continue
        style = {"color": "grey", "lw": 2.5, "ls": ":"} if variant.role == "clean" else {"color": colour}
        drawn = _distinct(variant.layers)
        _errorbar(ax, drawn, [variant.final(n) for n in drawn], marker="o",
                  label=f"{variant.label} (epoch {variant.final_probe_epoch})", **style)
        if untrained is None and variant.untrained_signature:
            untrained_lines.setdefault(variant.untrained_signature, (style["color"], []))[1].append(variant)
    for colour, members in untrained_lines.values():  # one thin dashed line per distinct untrained network
        names = ", ".join(v.label for v in members)
        drawn = _distinct(members[0].layers)
        ax.plot(drawn, [(bounds(members[0].untrained(n)) or (math.nan,))[0] for n in drawn],
                marker="x", ls="--", lw=0.9, color=colour, alpha=0.8,
                label=f"untrained: {names if len(names) <= 40 else names[:38] + '…'}")
    if untrained is not None:
        _errorbar(ax, layers, [untrained.untrained(n) for n in layers], color="black", ls="--", marker="x",
                  label="untrained, initial BN (epoch 0)")
        if any(untrained.calibrated(n) for n in layers):
            _errorbar(ax, layers, [untrained.calibrated(n) for n in layers], color="black", ls=":", marker="s",
                      label="untrained, BN calibrated")
    ax.set(title=title, xlabel="probe point (input → output)", ylabel="k-NN accuracy on true labels (%)")
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    return _save(fig, path)


def plot_lift_per_layer(variants: Sequence[VariantRuns], path: Path, title: str) -> Path:
    """Per probe point, each variant's final accuracy minus its own untrained network's (epoch 0, same queries), with
    the paired 95 % interval (one seed) or ± the seeds' sd and each seed's point."""
    fig, ax = plt.subplots(figsize=(9, 5))
    layers = _layers(variants)
    shown = [v for v in variants if v.probed]
    calibrated = bool(shown) and all(v.calibrated_lift("h") for v in shown)  # against the weights' baseline if all have it
    width = 0.6 / max(1, len(shown))
    for colour, variant in zip(_colours(len(variants)), variants):
        if variant not in shown:
            continue
        offset = (shown.index(variant) - (len(shown) - 1) / 2) * width
        xs = [layers.index(n) + offset for n in variant.layers if n in layers]
        lift = variant.calibrated_lift if calibrated else variant.lift
        _errorbar(ax, xs, [lift(n) for n in variant.layers if n in layers], marker="o", ls="none",
                  color="grey" if variant.role == "clean" else colour, label=variant.label)
    ax.axhline(0, color="black", lw=1, label="untrained, BN calibrated" if calibrated else "untrained (epoch 0)")
    ax.set_xticks(range(len(layers)), layers)
    ax.set(title=title, xlabel="probe point (input → output)",
           ylabel="final − untrained k-NN accuracy (points)")
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    return _save(fig, path)


def plot_fit_vs_epoch(variants: Sequence[VariantRuns], path: Path, title: str) -> Path:
    """Random-label training accuracy over epochs per variant (band: ± sd over seeds)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for colour, variant in zip(_colours(len(variants)), variants):
        _band(ax, variant.fit_band(), colour, variant.label, ls=":" if variant.role == "clean" else "-")
    ax.set(title=title, xlabel="epoch", ylabel="train accuracy on the run's labels (%)", ylim=(0, 101))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _xy_point(ax: Any, fit: dict[str, Any] | None, knn: dict[str, Any] | None, colour: Any) -> tuple[float, float] | None:
    """A (fit, k-NN) point with error bars both ways, and each seed's point when several."""
    x, y = bounds(fit), bounds(knn)
    if x is None or y is None:
        return None
    ax.errorbar([x[0]], [y[0]], xerr=[[x[0] - x[1]], [x[2] - x[0]]], yerr=[[y[0] - y[1]], [y[2] - y[0]]], fmt="o",
                color=colour, ms=7, capsize=3, zorder=3)
    if fit is not None and knn is not None and len(fit["per_seed"]) > 1:
        knn_by_seed = {p["seed"]: p["value"] for p in knn["per_seed"]}
        pairs = [(100 * p["value"], 100 * knn_by_seed[p["seed"]]) for p in fit["per_seed"] if p["seed"] in knn_by_seed]
        ax.plot([a for a, _ in pairs], [b for _, b in pairs], ".", color=colour, alpha=0.45)
    return x[0], y[0]


def plot_tradeoff(variants: Sequence[VariantRuns], path: Path, title: str, layers: Sequence[str]) -> Path:
    """Memorization vs generalization: final random-label fit against final k-NN, one point per variant."""
    untrained, _ = _reference(variants)
    fig, axes = plt.subplots(1, max(1, len(layers)), figsize=(5.5 * max(1, len(layers)), 4.6), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        for colour, variant in zip(_colours(len(variants)), variants):
            if variant.role == "clean":
                continue
            point = _xy_point(ax, variant.fit, variant.final(layer), colour)
            if point is not None:
                ax.annotate(variant.label, point, fontsize=7, xytext=(4, 4), textcoords="offset points")
        reference = bounds(untrained.untrained(layer)) if untrained is not None else None
        if reference is not None:
            ax.axhline(reference[0], color="black", ls="--", lw=1, label="untrained (epoch 0)")
            ax.legend(fontsize=8)
        ax.set(title=f"k-NN at {layer} vs fit", xlabel="fit of the random labels (train acc., %)",
               ylabel=f"k-NN accuracy at {layer} (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def plot_fit_vs_views(variants: Sequence[VariantRuns], path: Path, title: str) -> Path:
    """E: final fit against the number of labelled views N·n (log scale), ± sd over seeds."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = sorted((v.config.get("subset", 0) * (v.value or 1), v.label, v.fit) for v in variants
                    if v.fit is not None and v.role != "clean")
    if points:
        xs = [p[0] for p in points]
        _errorbar(ax, xs, [p[2] for p in points], marker="o")
        for x, label, fit in points:
            ax.annotate(label, (x, 100 * fit["accuracy"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(title=title, xlabel="random-labelled views N·n", ylabel="final fit of the view labels (%)", ylim=(0, 101))
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_capacity(variants: Sequence[VariantRuns], path: Path, title: str, layers: Sequence[str]) -> Path:
    """F: one panel per axis (projector width, training images, encoder width): fit and final k-NN against it, and
    each k-NN's lift over the variant's own untrained network (dashed)."""
    groups = list(dict.fromkeys(v.group for v in variants if v.group))
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5.2 * max(1, len(groups)), 4.4), squeeze=False)
    for ax, group in zip(axes.flat, groups):
        members = sorted((v for v in variants if v.group == group and v.fit is not None), key=lambda v: v.value or 0)
        xs = [v.value or 0 for v in members]
        _errorbar(ax, xs, [v.fit for v in members], color="black", marker="o", label="fit of random labels")
        for colour, layer in zip(_colours(len(layers)), layers):
            _errorbar(ax, xs, [v.final(layer) for v in members], color=colour, marker="s", label=f"k-NN {layer}")
            _errorbar(ax, xs, [v.lift(layer) for v in members], color=colour, marker="^", ls="--", lw=0.9,
                      label=f"lift of {layer} over untrained")
        if xs and min(xs) > 0 and max(xs) / min(xs) > 8:
            ax.set_xscale("log")
        ax.axhline(0, color="black", lw=0.6)
        ax.set(title=group, xlabel=group, ylabel="% (lift: points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)
