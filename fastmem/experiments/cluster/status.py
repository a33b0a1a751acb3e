"""`python -m fastmem.experiments status OUT [ID…]`: every run's state, job, requeues, last metrics and log.

Reads only files (OUT/<ID>/sweep.json, the run directories, the job records) and asks the executors
once (squeue for Slurm jobs); it takes no lock and changes nothing, so it can watch a running sweep.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from fastmem.errors import fail
from fastmem.experiments.cluster.ledger import latest_jobs, queue_snapshot, run_status, sweep_views


def sweep_ids(out: Path, ids: Sequence[str]) -> list[str]:
    """The experiments to show: the given ids (any case), else every folder of OUT with a sweep.json."""
    if not out.is_dir():
        fail(f"{out}: no such output folder (the --out of python -m fastmem.experiments run)")
    found = sorted(p.parent.name for p in out.glob("*/sweep.json"))
    if not ids:
        if not found:
            fail(f"{out}: no sweep here (no OUT/<ID>/sweep.json; run python -m fastmem.experiments run first)")
        return found
    chosen = []
    for experiment_id in dict.fromkeys(i.upper() for i in ids):
        if experiment_id not in found:
            fail(f"{out}: no sweep of experiment {experiment_id} (found: {', '.join(found) or 'none'})")
        chosen.append(experiment_id)
    return chosen


def status_report(out: Path, ids: Sequence[str] = ()) -> str:
    """The status lines of the chosen experiments' runs, one block per experiment."""
    chosen = sweep_ids(out, ids)
    views = {experiment_id: sweep_views(out / experiment_id) for experiment_id in chosen}
    jobs = latest_jobs(out)
    queue = queue_snapshot(jobs[v.run_dir.name] for vs in views.values() for v in vs if v.run_dir.name in jobs)
    blocks = []
    for experiment_id in chosen:
        plan = json.loads((out / experiment_id / "sweep.json").read_text())
        statuses = [run_status(view, jobs.get(view.run_dir.name), queue) for view in views[experiment_id]]
        counts: dict[str, int] = {}
        for status in statuses:
            counts[status.state] = counts.get(status.state, 0) + 1
        seeds = len({view.seed for view in views[experiment_id]}) > 1
        width = max(len(v.label) + (9 + len(str(v.seed)) if seeds else 0) for v in views[experiment_id])
        head = (f"{experiment_id}: {plan.get('title', '')} ({plan.get('scale', '?')} scale, {len(statuses)} runs): "
                + ", ".join(f"{n} {state}" for state, n in counts.items()))
        blocks.append("\n".join([head, *(f"  {s.line(width, seeds)}" for s in statuses)]))
    if queue.error:
        blocks.append(f"note: Slurm was not reachable ({queue.error}): queued and running jobs show as unknown")
    return "\n\n".join(blocks)
