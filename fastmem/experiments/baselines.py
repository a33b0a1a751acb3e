"""The sweep's second untrained baseline: every finished run gets its BN-calibrated untrained network's probe
(fastmem/probe/calibrated.py) before its report is written.

Runs that share an untrained network (same seed, model, data and probe settings: every variant of one seed, for most
experiments) share one probe: it is made once and its files are copied into the other runs. Runs that start from
another run's weights (J's `--init-from`) have no untrained network of their own and are skipped.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastmem.probe.calibrated import BASELINES_FILE, CALIBRATED_NAME, probe_calibrated_baseline
from fastmem.run.predictions import PREDICTIONS_DIR

# The knobs that decide a run's untrained network and how it is probed (labels and augmentation do not).
UNTRAINED_KNOBS = ("model", "width", "bottleneck_dim", "seed", "dataset", "data_dir", "subset", "probe_subset",
                   "probe_reference", "data_seed", "image_size", "channels_last", "probe_k", "probe_vote",
                   "probe_temperature", "probe_project_dim")


def untrained_key(run_dir: Path) -> tuple[Any, ...] | None:
    """What identifies the run's untrained network and its probe (None for runs that start from other weights)."""
    saved = json.loads((run_dir / "config.json").read_text())
    if saved.get("init_from"):
        return None
    resolved = saved.get("resolved", {})
    return (*(saved.get(k) for k in UNTRAINED_KNOBS), resolved.get("device"), resolved.get("precision"))


def _files(run_dir: Path) -> list[Path]:
    return [run_dir / PREDICTIONS_DIR / f"{CALIBRATED_NAME}.npz", run_dir / BASELINES_FILE]


def has_calibrated_baseline(run_dir: Path) -> bool:
    return all(path.exists() for path in _files(run_dir))


def ensure_calibrated_baselines(run_dirs: Sequence[Path], say: Callable[[str], None] = print) -> int:
    """Probe (or copy) the calibrated baseline of every finished run that lacks it; returns the probes made."""
    made = 0
    done: dict[tuple[Any, ...], Path] = {}
    finished = [d for d in dict.fromkeys(run_dirs) if (d / "summary.json").exists()]
    siblings = {p.parent for d in finished for p in d.parent.glob("*/config.json")}  # e.g. OUT/runs/*: other sweeps'
    for run_dir in [*finished, *sorted(siblings - set(finished))]:  # the ones that have it serve the others
        if has_calibrated_baseline(run_dir) and (run_dir / "summary.json").exists():
            key = untrained_key(run_dir)
            if key is not None:
                done.setdefault(key, run_dir)
    for run_dir in finished:
        key = untrained_key(run_dir)
        if key is None or has_calibrated_baseline(run_dir):
            continue
        if key in done:
            for source, target in zip(_files(done[key]), _files(run_dir)):
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target.with_name(target.name + ".tmp"))
                target.with_name(target.name + ".tmp").replace(target)
            continue
        say(f"[baseline] untrained, BN calibrated: probing {run_dir.name}")
        probe_calibrated_baseline(run_dir)
        done[key] = run_dir
        made += 1
    return made
