"""The main job's figure (PNG, matplotlib's Agg backend): per-layer k-NN and label fit over training."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fastmem.report.figures import save_figure  # noqa: E402
from fastmem.report.main_job import CALIBRATED  # noqa: E402
from fastmem.run.metrics import RunRecords  # noqa: E402


def _percent(value: float | None) -> float:
    return math.nan if value is None else 100 * value


def _error_bars(entries: list[Mapping[str, Any] | None]) -> tuple[list[float], list[list[float]]]:
    """Centres and (lower, upper) bar lengths in percent: the 95 % interval (one seed) or ± the seeds' sd."""
    centres, lows, highs = [], [], []
    for entry in entries:
        if not entry:
            centres.append(math.nan), lows.append(0.0), highs.append(0.0)
            continue
        value = 100 * entry["accuracy"]
        if "interval_95" in entry:
            low, high = (100 * v for v in entry["interval_95"])
        else:
            low, high = value - 100 * entry["seed_std"], value + 100 * entry["seed_std"]
        centres.append(value), lows.append(value - low), highs.append(high - value)
    return centres, [lows, highs]


def plot_benign_vs_malign(runs: Mapping[str, RunRecords], path: str | Path, title: str,
                          payload: Mapping[str, Any] | None = None) -> Path:
    """Three panels: final per-layer k-NN per run (with the untrained net; error bars from `payload`, the main
    job's summary, when given), k-NN of each layer over epochs, and the random-label fit over epochs."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    first = next(iter(runs.values()))
    layers = first.layers
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if payload is not None:
        rows = payload["layers"]
        keys = list(rows)  # one entry per distinct probe point (h stands for the last stage too)
        names = [payload.get("layer_names", {}).get(n, n) for n in keys]
        centres, bars = _error_bars([rows[n].get("untrained") for n in keys])
        axes[0].errorbar(names, centres, yerr=bars, fmt="k--o", capsize=3, label="untrained, initial BN (epoch 0)")
        if any(CALIBRATED in rows[n] for n in keys):
            centres, bars = _error_bars([rows[n].get(CALIBRATED) for n in keys])
            axes[0].errorbar(names, centres, yerr=bars, fmt="--s", color="grey", capsize=3,
                             label="untrained, BN calibrated")
        for colour, label in zip(colours, runs):
            centres, bars = _error_bars([rows[n].get(label) for n in keys])
            axes[0].errorbar(names, centres, yerr=bars, fmt="-o", color=colour, capsize=3,
                             label=f"{label} (epoch {runs[label].final_probe_epoch})")
            if len(payload.get("seeds", [])) > 1:  # every seed's point beside the mean
                points = [(name, 100 * p["value"]) for n, name in zip(keys, names)
                          for p in (rows[n].get(label) or {}).get("per_seed", [])]
                axes[0].plot([n for n, _ in points], [v for _, v in points], ".", color=colour, alpha=0.5)
    else:
        untrained = first.untrained
        axes[0].plot(layers, [_percent(untrained.get(n)) for n in layers], "k--", marker="o", label="untrained (epoch 0)")
        for colour, (label, records) in zip(colours, runs.items()):
            axes[0].plot(layers, [_percent(records.final_knn(n)) for n in layers], marker="o", color=colour,
                         label=f"{label} (epoch {records.final_probe_epoch})")
    for colour, (label, records) in zip(colours, runs.items()):
        shown = dict.fromkeys((layers[-1], layers[-2], "h", layers[min(2, len(layers) - 1)]))
        for style, layer in zip(("-", "--", ":", "-."), shown):
            curve = records.knn_curve(layer)
            axes[1].plot([e for e, _ in curve], [100 * a for _, a in curve], style, color=colour, label=f"{label}: {layer}")
        fit = records.fit_curve()
        axes[2].plot([e for e, _ in fit], [100 * f for _, f in fit], color=colour, label=label)
    axes[0].set(title="k-NN accuracy (true labels) per layer", xlabel="probe point", ylabel="k-NN accuracy (%)")
    axes[0].tick_params(axis="x", rotation=30)
    axes[1].set(title="k-NN accuracy over training", xlabel="epoch", ylabel="k-NN accuracy (%)")
    axes[2].set(title="fit of the random training labels", xlabel="epoch", ylabel="train accuracy on random labels (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, Path(path), dpi=110)
