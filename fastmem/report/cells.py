"""Aggregating one figure over seeds, and the table cell that shows it: shared by the main job's summary
(fastmem/report/main_job.py) and the sweep reports (fastmem/report/render.py).

An *entry* is a dict: `accuracy` (or `delta`, for a difference) = the mean over seeds; with one seed
`interval_95` = [low, high] (where the figure has an interval), with several `seed_std` = the seeds' sample
standard deviation; `per_seed` = each seed's value (and interval). `cell` writes it in percent:
`76.7 ± 0.8` (half the 95 % interval), `+2.1 [+1.2, +3.0]` (a difference with its interval),
`76.7 ± 0.8 sd` (several seeds), or the bare value where there is no interval (runs of older formats).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastmem.run.stats import Interval, seed_spread

Value = Interval | float  # a figure with its 95 % interval, or a bare value (no interval known)


def _estimate(value: Value) -> float:
    return value.estimate if isinstance(value, Interval) else float(value)


def seed_entry(values: Sequence[tuple[int, Value]]) -> dict[str, Any]:
    """Mean over seeds, the 95 % interval when one seed (if it has one), the seeds' standard deviation when several."""
    mean, std = seed_spread([_estimate(v) for _, v in values])
    entry: dict[str, Any] = {"accuracy": mean}
    if len(values) == 1:
        if isinstance(values[0][1], Interval):
            entry["interval_95"] = [values[0][1].low, values[0][1].high]
    else:
        entry["seed_std"] = std
    entry["per_seed"] = [{"seed": s, "value": v.estimate, "low": v.low, "high": v.high} if isinstance(v, Interval)
                         else {"seed": s, "value": float(v)} for s, v in values]
    return entry


def delta_entry(values: Sequence[tuple[int, Value]]) -> dict[str, Any]:
    """`seed_entry` of a difference (key `delta`), and whether every seed's interval lies above 0."""
    entry = seed_entry(values)
    entry["delta"] = entry.pop("accuracy")
    if all(isinstance(v, Interval) for _, v in values):
        entry["all_seeds_exclude_zero_above"] = all(v.low > 0 for _, v in values)  # type: ignore[union-attr]
    return entry


def cell(entry: Mapping[str, Any] | None, signed: bool = False) -> str:
    """An entry in percent: `76.7 ± 0.8`, `+2.1 [+1.2, +3.0]` (signed), `76.7 ± 0.8 sd`, or the bare value."""
    if not entry:
        return "–"
    value = entry["delta" if "delta" in entry else "accuracy"]
    sign = "+" if signed else ""
    if "interval_95" in entry:
        low, high = entry["interval_95"]
        if signed:
            return f"{100 * value:{sign}.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"
        return f"{100 * value:.1f} ± {100 * (high - low) / 2:.1f}"
    if "seed_std" in entry:
        return f"{100 * value:{sign}.1f} ± {100 * entry['seed_std']:.1f} sd"
    return f"{100 * value:{sign}.1f}"


def bounds(entry: Mapping[str, Any] | None) -> tuple[float, float, float] | None:
    """(centre, low, high) of an entry in percent, for an error bar: the 95 % interval (one seed), ± the seeds' sd
    (several), or a zero-length bar (no interval known); None without an entry."""
    if not entry:
        return None
    value = 100 * entry["delta" if "delta" in entry else "accuracy"]
    if "interval_95" in entry:
        low, high = (100 * v for v in entry["interval_95"])
        return value, low, high
    spread = 100 * entry.get("seed_std", 0.0)
    return value, value - spread, value + spread
