"""Commit the evidence: copy what a sweep's report and judge read into a folder that lives in git.

`python -m fastmem.experiments export OUT DEST [ID ...]` writes, for each experiment ID of the sweep folder OUT:
    DEST/<ID>/sweep.json            the plan with its claims, run paths pointing into DEST/runs
    DEST/<ID>/report.md + PNGs      the report rendered from DEST's copies alone
    DEST/runs/<run>/                config.json, summary.json, metrics.jsonl and the kept predictions the report
                                    and the judge read: the epoch-0 and final probes and the BN-calibrated baseline
                                    (compressed .npz), with baselines.json; no checkpoints, no embeddings, no logs
`python -m fastmem.report DEST/<ID> --out DIR` on a fresh clone re-renders the same report.md and verdicts.
Only finished runs are exported; a run of the plan that is not finished yet is left out of the copied plan, and the
report says how many seeds each verdict rests on.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fastmem.errors import fail
from fastmem.experiments.claims import claims_for
from fastmem.io_utils import write_json_atomic
from fastmem.probe.calibrated import BASELINES_FILE, CALIBRATED_NAME
from fastmem.run.metrics import RunRecords
from fastmem.run.predictions import PREDICTIONS_DIR, predictions_path

RUN_FILES = ("config.json", "summary.json", "metrics.jsonl", BASELINES_FILE)


def export_run(run_dir: Path, dest: Path) -> Path:
    """Copy one finished run's evidence into DEST/runs/<name> (atomically per file); returns the copy's folder."""
    target = dest / "runs" / run_dir.name
    (target / PREDICTIONS_DIR).mkdir(parents=True, exist_ok=True)
    final = RunRecords.read(run_dir).final_probe_epoch
    wanted = [run_dir / name for name in RUN_FILES]
    wanted += [predictions_path(run_dir, 0), run_dir / PREDICTIONS_DIR / f"{CALIBRATED_NAME}.npz"]
    if final:
        wanted.append(predictions_path(run_dir, final))
    for source in wanted:
        if source.exists():
            copy = target / source.relative_to(run_dir)
            temporary = copy.with_name(copy.name + ".tmp")
            shutil.copyfile(source, temporary)
            os.replace(temporary, copy)
    return target


def export_sweep(sweep_dir: Path, dest: Path) -> Path:
    """Export an experiment's finished runs and its plan into DEST; returns DEST/<ID>."""
    plan_path = sweep_dir / "sweep.json"
    if not plan_path.is_file():
        fail(f"{sweep_dir}: not a sweep folder (no sweep.json)")
    plan = json.loads(plan_path.read_text())
    target = dest / plan["experiment"]
    target.mkdir(parents=True, exist_ok=True)
    entries = []
    for entry in plan["runs"]:
        run_dir = (sweep_dir / entry["run_dir"]).resolve()
        if not (run_dir / "summary.json").exists():
            continue  # not finished: not evidence yet
        copy = export_run(run_dir, dest)
        entries.append({**entry, "run_dir": os.path.relpath(copy, target)})
    seeds = len({e.get("seed", 0) for e in entries})
    claims = [claim.to_dict() for claim in claims_for(plan["experiment"], plan["scale"])]  # as declared now
    write_json_atomic(target / "sweep.json", {**plan, "claims": claims, "runs": entries, "seeds": seeds},
                      sort_keys=False)
    return target


def evidence_bytes(dest: Path) -> int:
    return sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
