"""Memorization scaling: how many randomly labelled augmented views a model memorizes, and how fast.

Experiment E's mechanism (`--augment fullfixed:n:random`: N images × n fixed views, one random label
per view) for growing N·n and a few model/projector widths. Each case is an ordinary
`python -m fastmem.train` run, watched through its metrics.jsonl and stopped once the fit of the view
labels reaches --target (default 95 %) or the case's time budget is spent. Two configurations run side
by side for every case:
  - fastmem:   the device pipeline (fused augmentation), autocast (bf16 where fast), channels_last;
  - reference: the paper code's setup — a torch DataLoader, fp32, NCHW.
Reported per case: fit reached, epochs and training seconds to reach the target, images/s, and views
memorized per hour: the views fit beyond chance, (fit − 1/C)/(1 − 1/C) · N·n, over the training time. JSON to benchmarks/results/ plus a PNG.

    python benchmarks/memorization_scaling.py                  # CPU sizes (Fashion-MNIST, ~15 min on 2 cores)
    python benchmarks/memorization_scaling.py --preset gpu     # CIFAR-10-sized synthetic data up to N·n = 5M views
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine, machine_label  # noqa: E402

from fastmem.data.labels import load_labels  # noqa: E402
from fastmem.run.metrics import RunRecords  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"dataset": "fashion-mnist", "images": 1000, "views": [1, 4, 16], "device": "cpu", "budget_s": 60,
            "models": [("small_cnn", 0.5, 4096), ("small_cnn", 1.0, 16384)], "batch_size": 256, "workers": 2},
    "gpu": {"dataset": "synthetic", "images": 50000, "views": [1, 10, 100], "device": "cuda", "budget_s": 90,
            "models": [("resnet18", 1.0, 4096), ("resnet18", 1.0, 65536)], "batch_size": 512, "workers": 8},
}
CONFIGS = {
    "fastmem": ["--pipeline", "device", "--precision", "auto", "--channels-last", "true"],
    "reference": ["--pipeline", "torch", "--precision", "fp32", "--channels-last", "false"],
}


def run_case(preset: dict[str, Any], model: tuple[str, float, int], views: int, config: str, target: float,
             threads: int, workdir: Path) -> dict[str, Any]:
    """Train one case until the view labels are fit to `target` or the budget is spent."""
    name, width, bottleneck = model
    run_dir = workdir / f"{config}-{name}-w{width:g}-B{bottleneck}-n{views}"
    command = [
        sys.executable, "-m", "fastmem.train", "--dataset", preset["dataset"], "--subset", str(preset["images"]),
        "--augment", f"fullfixed:{views}:random", "--label-noise", "1", "--model", name, "--width", str(width),
        "--bottleneck-dim", str(bottleneck), "--batch-size", str(preset["batch_size"]), "--epochs", "100000",
        "--probe-every", "-1", "--checkpoint-every", "100000", "--device", preset["device"], "--progress", "false",
        "--workers", str(preset["workers"] if config == "reference" else 0), "--out", str(run_dir), *CONFIGS[config],
    ]
    if threads:
        command += ["--threads", str(threads)]
    started = time.perf_counter()
    log = open(workdir / f"{run_dir.name}.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    records: list[Mapping[str, Any]] = []
    reached = None
    while process.poll() is None:
        time.sleep(0.5)
        records = RunRecords.read(run_dir).fits
        reached = next((r["epoch"] for r in records if r["train_acc_random"] >= target), None)
        if reached is not None or sum(r["seconds"] for r in records) >= preset["budget_s"]:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
    log.close()
    if not records:
        raise SystemExit(f"case {run_dir.name} produced no epochs; see {workdir / (run_dir.name + '.log')}")
    used = [r for r in records if reached is None or r["epoch"] <= reached]
    train_seconds = sum(r["seconds"] for r in used)
    fit = max(r["train_acc_random"] for r in used)
    num_views = preset["images"] * views
    chance = 1.0 / load_labels(run_dir / "labels.npz").num_classes
    memorized = max(0.0, fit - chance) / (1.0 - chance) * num_views  # views fit beyond what guessing gives
    return {
        "config": config, "model": name, "width": width, "bottleneck_dim": bottleneck, "images": preset["images"],
        "views_per_image": views, "labelled_views": num_views, "epochs": len(used), "fit": fit,
        "reached_target": reached is not None, "epochs_to_target": reached, "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "images_per_s": sum(r["images_per_s"] for r in used) / len(used),
        "views_memorized": memorized,
        "views_memorized_per_hour": memorized / (train_seconds / 3600) if train_seconds > 0 else 0.0,
    }


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    keys = sorted({(r["config"], r["model"], r["width"], r["bottleneck_dim"]) for r in results})
    for key in keys:
        rows = sorted((r for r in results if (r["config"], r["model"], r["width"], r["bottleneck_dim"]) == key),
                      key=lambda r: r["labelled_views"])
        label = f"{key[0]}: {key[1]} ×{key[2]:g}, B={key[3]}"
        style = "-o" if key[0] == "fastmem" else "--s"
        axes[0].plot([r["labelled_views"] for r in rows], [100 * r["fit"] for r in rows], style, label=label)
        axes[1].plot([r["labelled_views"] for r in rows], [r["views_memorized_per_hour"] for r in rows], style, label=label)
    axes[0].set(xscale="log", xlabel="randomly labelled views N·n", ylabel="fit reached (%)", ylim=(0, 101),
                title="fit of the view labels within the budget")
    axes[1].set(xscale="log", yscale="log", xlabel="randomly labelled views N·n", ylabel="views memorized per hour",
                title="memorization speed")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--views", type=int, nargs="+", default=None, help="views per image n (overrides the preset)")
    parser.add_argument("--images", type=int, default=None, help="training images N (overrides the preset)")
    parser.add_argument("--budget-s", type=float, default=None, help="training seconds per case (overrides the preset)")
    parser.add_argument("--target", type=float, default=0.95, help="fit of the view labels that counts as memorized")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per case (0 = all cores)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/memorization_scaling-<preset>.json)")
    args = parser.parse_args()
    preset = dict(PRESETS[args.preset])
    for key, value in (("views", args.views), ("images", args.images), ("budget_s", args.budget_s)):
        if value is not None:
            preset[key] = value
    device = torch.device(preset["device"])
    machine = describe_machine(device)
    threads = args.threads or (os.cpu_count() or 1 if device.type == "cpu" else 0)
    results = []
    print(f"memorization scaling on {machine_label(machine)}: {preset['dataset']}, N={preset['images']}, "
          f"n={preset['views']}, target fit {args.target:.0%}, budget {preset['budget_s']:g} s per case", flush=True)
    header = f"{'config':<10} {'model':<22} {'N·n':>8} {'epochs':>6} {'fit':>6} {'to target':>10} {'img/s':>8} {'views/h':>11}"
    print(header, flush=True)
    with tempfile.TemporaryDirectory(prefix="memscale-") as tmp:
        for model in preset["models"]:
            for views in preset["views"]:
                for config in CONFIGS:  # the two configurations side by side, case by case
                    row = run_case(preset, model, views, config, args.target, threads, Path(tmp))
                    results.append(row)
                    to_target = f"{row['train_seconds']:.0f} s" if row["reached_target"] else "not reached"
                    print(f"{config:<10} {f'{model[0]} ×{model[1]:g} B={model[2]}':<22} {row['labelled_views']:>8} "
                          f"{row['epochs']:>6} {100 * row['fit']:>5.1f}% {to_target:>10} {row['images_per_s']:>8.0f} "
                          f"{row['views_memorized_per_hour']:>11.3g}", flush=True)
    for model in preset["models"]:
        for views in preset["views"]:
            pair = {r["config"]: r for r in results if (r["model"], r["width"], r["bottleneck_dim"]) == model
                    and r["views_per_image"] == views}
            fast, ref = pair["fastmem"], pair["reference"]
            case = f"  {model[0]} ×{model[1]:g} B={model[2]}, N·n={preset['images'] * views}: "
            if fast["reached_target"] and ref["reached_target"]:
                print(case + f"target reached {ref['train_seconds'] / fast['train_seconds']:.2f}× sooner with fastmem")
            elif ref["views_memorized_per_hour"] > 0:
                print(case + f"fastmem memorizes {fast['views_memorized_per_hour'] / ref['views_memorized_per_hour']:.2f}× "
                      "as many views per hour as the reference setup")
            else:
                print(case + f"fastmem {fast['views_memorized']:.0f} views memorized, reference none beyond chance")
    out = args.out or RESULTS / f"memorization_scaling-{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "preset": preset, "target": args.target, "threads": threads, "results": results}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    plot(results, out.with_suffix(".png"), f"Memorization scaling on {machine_label(machine)}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
