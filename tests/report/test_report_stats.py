"""Sweep reports carry statistics: a smoke sweep of A with --seeds 2 reports mean ± the seeds' sd (checked by hand
against the runs' metrics) and the lift over each run's own untrained network; one seed gives Wilson intervals and
paired lift intervals; runs of an older format (no query counts, no predictions) still render, without intervals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_module

from fastmem.report.cells import cell, delta_entry, seed_entry
from fastmem.report.intervals import paired_deltas
from fastmem.report.layers import distinct_layers
from fastmem.report.render import main, write_report
from fastmem.run.metrics import RunRecords
from fastmem.run.predictions import PREDICTIONS_DIR
from fastmem.run.stats import Interval, wilson_interval

LABEL = "random labels, full aug"


@pytest.fixture(scope="module")
def seeded_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Experiment A at the smoke scale, one epoch, synthetic 16 px images, seeds 0 and 1 (6 runs, with its report)."""
    out = tmp_path_factory.mktemp("seeds")
    result = run_module("fastmem.experiments", "run", "A", "--scale", "smoke", "--seeds", "2", "--out", str(out),
                        "--jobs", "2", "--set", "epochs=1", "--set", "dataset=synthetic", "--set", "image_size=16",
                        timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def _rows(report: str, section: str) -> dict[str, list[str]]:
    """The markdown table under `section`, as {first cell: the other cells} (the header under "header")."""
    lines = report.split(section)[1].strip().splitlines()
    table = [line for line in lines[: next((i for i, x in enumerate(lines) if not x.startswith("|")), len(lines))]]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    return {"header": cells[0][1:], **{row[0]: row[1:] for row in cells[2:]}}


def _sub_sweep(seeded_sweep: Path, dest: Path, seed: int) -> Path:
    """A sweep folder holding only the runs of one seed of `seeded_sweep` (a one-seed sweep over the same runs)."""
    plan = json.loads((seeded_sweep / "A" / "sweep.json").read_text())
    runs = [{**e, "run_dir": str((seeded_sweep / "A" / e["run_dir"]).resolve())} for e in plan["runs"] if e["seed"] == seed]
    (dest / "A").mkdir(parents=True)
    (dest / "A" / "sweep.json").write_text(json.dumps({**plan, "seeds": 1, "runs": runs}))
    return dest / "A"


def _sd_cell(values: list[float], signed: bool = False) -> str:
    """Mean ± sample standard deviation by hand, in percent."""
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{100 * mean:{'+' if signed else ''}.1f} ± {100 * sd:.1f} sd"


def _entries(seeded_sweep: Path, label: str) -> list[tuple[int, Path]]:
    plan = json.loads((seeded_sweep / "A" / "sweep.json").read_text())
    return sorted((e["seed"], (seeded_sweep / "A" / e["run_dir"]).resolve()) for e in plan["runs"] if e["label"] == label)


def test_seeds_give_mean_and_sd_over_the_runs_by_hand(seeded_sweep: Path) -> None:
    report = (seeded_sweep / "A" / "report" / "report.md").read_text()
    results = _rows(report, "## Results (accuracy in %)")
    assert results["header"][:5] == ["seeds", "epochs", "fit (own labels)", "agree (true labels)", "stem"]
    assert results["*untrained, initial BN (epoch 0)*"][0] == "2"  # A's variants share their untrained networks: one row
    entries = _entries(seeded_sweep, LABEL)
    assert [seed for seed, _ in entries] == [0, 1]
    records = [RunRecords.read(run_dir) for _, run_dir in entries]
    queries = [int(r.probes[-1]["probe_queries"]) for r in records]
    named = distinct_layers(records[0].layers)
    for layer, shown in named:  # accuracies are hits / queries (h is named once: the pooled last block)
        finals = [round(r.final_knn(layer) * n) / n for r, n in zip(records, queries)]
        assert results[LABEL][results["header"].index(shown)] == _sd_cell(finals), layer
        untrained = [round(r.untrained_knn(layer) * n) / n for r, n in zip(records, queries)]
        assert results["*untrained, initial BN (epoch 0)*"][results["header"].index(shown)] == _sd_cell(untrained), layer
    assert results[LABEL][2] == _sd_cell([r.final_fit for r in records])
    lifts = _rows(report, "## Lift over the untrained network, initial BN (points)")
    assert lifts["header"] == [shown for _, shown in named]
    for layer, shown in named:  # each seed's lift on its own queries: (hits at the end − hits at epoch 0) / queries
        per_seed = [(round(r.final_knn(layer) * n) - round(r.untrained_knn(layer) * n)) / n
                    for r, n in zip(records, queries)]
        assert lifts[LABEL][lifts["header"].index(shown)] == _sd_cell(per_seed, signed=True), layer
    assert "mean over seeds 0, 1 ± the seeds' sample standard deviation (sd)" in report
    assert "--seeds 2" in report and "| seed |" in report  # reproduce line; the runs table names each seed
    for png in ("final_per_layer.png", "lift_per_layer.png", "knn_vs_epoch.png", "fit_vs_epoch.png"):
        data = (seeded_sweep / "A" / "report" / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5_000, png
        assert f"]({png})" in report


def test_one_seed_gives_wilson_intervals_and_paired_lifts(seeded_sweep: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    sweep_dir = _sub_sweep(seeded_sweep, tmp_path / "one", seed=1)
    assert main([str(sweep_dir)]) == 0
    report = (sweep_dir / "report" / "report.md").read_text()
    assert "## Verdicts" in capsys.readouterr().out  # the CLI prints the results and the verdicts
    results = _rows(report, "## Results (accuracy in %)")
    lifts = _rows(report, "## Lift over the untrained network, initial BN (points)")
    assert results["header"][0] == "epochs" and " sd" not in report.split("## Lift")[0]
    (_, run_dir), = [e for e in _entries(seeded_sweep, LABEL) if e[0] == 1]
    records = RunRecords.read(run_dir)
    final = records.final_probe_epoch
    deltas = paired_deltas(run_dir, final, run_dir, 0)
    for layer, shown in distinct_layers(records.layers):
        n = int(records.probes[-1]["probe_queries"])
        interval = wilson_interval(round(records.final_knn(layer) * n), n)
        assert results[LABEL][results["header"].index(shown)] == \
            f"{100 * interval.estimate:.1f} ± {100 * interval.half_width:.1f}", layer
        lift = deltas[layer]
        assert lifts[LABEL][lifts["header"].index(shown)] == \
            f"{100 * lift.estimate:+.1f} [{100 * lift.low:+.1f}, {100 * lift.high:+.1f}]", layer
    assert f"95 % Wilson interval over the {n} test queries" in report


def test_runs_without_predictions_or_query_counts_still_render(seeded_sweep: Path, tmp_path: Path) -> None:
    """Older runs: metrics without probe_queries, no probe_predictions/; a probe reference in the config; one variant
    whose untrained network differs gets its own untrained row."""
    sweep_dir = _sub_sweep(seeded_sweep, tmp_path / "old", seed=0)
    plan = json.loads((sweep_dir / "sweep.json").read_text())
    for number, entry in enumerate(plan["runs"]):
        source, copy = Path(entry["run_dir"]), tmp_path / "runs" / Path(entry["run_dir"]).name
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns(PREDICTIONS_DIR, "*.pt"))
        records = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
        for record in records:
            record.pop("probe_queries", None)
            if number == 1 and record["epoch"] == 0:  # the second variant: another untrained network
                record["knn/h"] = 0.123
        (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "probe_reference": 200}))
        entry["run_dir"] = str(copy)
        for key in ("seed", "epochs"):
            entry.pop(key)
    (sweep_dir / "sweep.json").write_text(json.dumps({k: v for k, v in plan.items() if k != "seeds"}))
    report = write_report(sweep_dir).read_text()
    results = _rows(report, "## Results (accuracy in %)")
    assert "±" not in report.split("## Results")[1].split("## Final k-NN")[0] and "[" not in report.split("## Lift")[1].split("## ")[0]
    records = RunRecords.read(tmp_path / "runs" / Path(plan["runs"][0]["run_dir"]).name)
    h = results["header"].index(dict(distinct_layers(records.layers))["h"])
    assert results[plan["runs"][0]["label"]][h] == f"{100 * records.final_knn('h'):.1f}"
    lifts = _rows(report, "## Lift over the untrained network, initial BN (points)")
    assert lifts[plan["runs"][0]["label"]][lifts["header"].index(dict(distinct_layers(records.layers))["h"])] == f"{100 * (records.final_knn('h') - records.untrained_knn('h')):+.1f}"
    assert "no query counts or predictions (an older format)" in report
    assert "Bare values: runs that kept no per-query predictions" in report
    untrained_rows = [line for line in report.splitlines() if line.startswith("| *untrained, initial BN (epoch 0)* |")]
    assert len(untrained_rows) == 3 and "| 12.3 |" in untrained_rows[1]  # shared, the odd one, shared again
    assert "their untrained networks differ" in report
    assert ("reference = the first 200 training images of the data seed's order (fixed across N), with their true "
            "labels") in report


def test_cells_of_one_seed_several_seeds_and_bare_values() -> None:
    assert cell(seed_entry([(0, Interval(0.767, 0.759, 0.775))])) == "76.7 ± 0.8"
    assert cell(delta_entry([(0, Interval(0.021, 0.012, 0.030))]), signed=True) == "+2.1 [+1.2, +3.0]"
    assert cell(seed_entry([(0, 0.70), (1, 0.72), (2, 0.74)])) == "72.0 ± 2.0 sd"
    assert cell(delta_entry([(0, -0.01), (1, -0.03)]), signed=True) == "-2.0 ± 1.4 sd"
    assert cell(seed_entry([(0, 0.5)])) == "50.0" and cell(None) == "–"
