"""Experiments A–K: every smoke scale runs end to end with its report; the sweep survives a kill; bad specs fail early."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_module

from fastmem.errors import FastmemError
from fastmem.experiments import EXPERIMENTS, Experiment, Variant, plan_experiment, sweep
from fastmem.run.config import TrainConfig
from fastmem.run.metrics import RunRecords, read_metrics

TIMING_KEYS = {"images_per_s", "seconds"}


def _metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def smoke_sweeps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every experiment at the smoke scale, in one invocation (runs shared between experiments train once)."""
    out = tmp_path_factory.mktemp("smoke")
    result = run_module("fastmem.experiments", "run", "all", "--scale", "smoke", "--out", str(out), "--jobs", "2",
                        timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_list_shows_every_experiment() -> None:
    result = run_module("fastmem.experiments", "list")
    assert result.returncode == 0, result.stderr
    for experiment_id in "ABCDEFGHIJK":
        assert f"\n{experiment_id} " in "\n" + result.stdout
    assert "expected:" in result.stdout and "cpu: dataset=fashion-mnist" in result.stdout


@pytest.mark.parametrize("experiment_id", list(EXPERIMENTS))
def test_smoke_scale_runs_and_report_renders(smoke_sweeps: Path, experiment_id: str) -> None:
    sweep_dir = smoke_sweeps / experiment_id
    plan = json.loads((sweep_dir / "sweep.json").read_text())
    assert plan["experiment"] == experiment_id and plan["runs"]
    for entry in plan["runs"]:
        run_dir = sweep_dir / entry["run_dir"]
        assert (run_dir / "summary.json").exists(), entry["label"]
        probes = RunRecords.read(run_dir).probes
        assert probes[0]["epoch"] == 0 and probes[-1]["epoch"] == json.loads((run_dir / "config.json").read_text())["epochs"]
    report = (sweep_dir / "report" / "report.md").read_text()
    assert f"# Experiment {experiment_id}:" in report and "| *untrained, initial BN (epoch 0)* |" in report
    assert "## Verdicts" in report and "## Lift over the untrained network, BN calibrated (points)" in report
    if experiment_id != "J":  # J's runs start from its source's weights; its source has an untrained network
        assert "| *untrained, BN calibrated* |" in report
    for entry in plan["runs"]:
        assert entry["label"] in report
    for png in ("final_per_layer.png", "knn_vs_epoch.png", "fit_vs_epoch.png", *(f"{p}.png" for p in plan["plots"])):
        data = (sweep_dir / "report" / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5_000, png
        assert f"]({png})" in report


def test_shared_runs_train_once_and_j_starts_from_its_source(smoke_sweeps: Path) -> None:
    a = json.loads((smoke_sweeps / "A" / "sweep.json").read_text())
    k = json.loads((smoke_sweeps / "K" / "sweep.json").read_text())
    clean = {e["label"]: e["run_dir"] for e in a["runs"]}["clean labels, full aug"]
    assert clean in {e["run_dir"] for e in k["runs"]}
    assert (smoke_sweeps / "A" / clean / "train.log").read_text().count("run ") == 1  # trained once
    j = json.loads((smoke_sweeps / "J" / "sweep.json").read_text())
    source = next(e for e in j["runs"] if e["role"] == "source")
    for entry in j["runs"]:
        if entry["init_from"]:
            config = json.loads((smoke_sweeps / "J" / entry["run_dir"] / "config.json").read_text())
            assert Path(config["init_from"]).resolve() == (smoke_sweeps / "J" / source["run_dir"] / "checkpoint.pt").resolve()
            assert config["reinit"] and config["label_seed"] == 1


def test_a_full_disk_during_a_report_is_one_line_and_leaves_the_previous_report(smoke_sweeps: Path) -> None:
    """RLIMIT_FSIZE below a PNG's size (writes past it fail with EFBIG, as on a full disk)."""
    report_dir = smoke_sweeps / "A" / "report"
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(report_dir.iterdir())}

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4_096, resource.RLIM_INFINITY))

    env = {**os.environ, "FASTMEM_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "fastmem.report", str(smoke_sweeps / "A")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("fastmem: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert ".png: cannot write it" in errors[0] and "disk full" in errors[0], errors[0]
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(report_dir.iterdir())}
    assert after == before  # every figure and report.md as they were; no temp file left


@pytest.mark.parametrize("args, message", [
    (["run", "Z", "--scale", "smoke"], "unknown experiment 'Z'"),
    (["run", "A", "--scale", "smoke", "--set", "colour=red"], "--set 'colour=red': expected KNOB=VALUE"),
    (["run", "A", "--scale", "smoke", "--set", "epochs=many"], "epochs expects int"),
])
def test_bad_requests_fail_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_module("fastmem.experiments", *args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_paper_scale_without_cifar_fails_before_any_run(tmp_path: Path) -> None:
    empty = tmp_path / "no-data"
    empty.mkdir()
    result = run_module("fastmem.experiments", "run", "C", "--scale", "paper", "--set", "device=cpu",
                        "--data-dir", str(empty), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "cifar10" in result.stderr and "not found" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


PINNED = {  # `auto` precision enters the identity as the machine's decision (fastmem/experiments/sweep.py)
    "bf16": ({"random labels, full aug": "augmentfull-label_noise1.0-cafadb2167",
              "random labels, no aug": "augmentnone-label_noise1.0-dc6e1ae2de",
              "clean labels, full aug": "augmentfull-label_noise0.0-32e4140e3a"},
             "augmentnone-epochs250-label_noise1.0-label_seed1-reinitstage4_head-32b0866867"),
    "fp32": ({"random labels, full aug": "augmentfull-label_noise1.0-b5d23c4d04",
              "random labels, no aug": "augmentnone-label_noise1.0-845e6e31e1",
              "clean labels, full aug": "augmentfull-label_noise0.0-6c7b94372c"},
             "augmentnone-epochs250-label_noise1.0-label_seed1-reinitstage4_head-1526c1f5cc"),
}


@pytest.mark.parametrize("decided", sorted(PINNED))
def test_run_identities_are_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decided: str) -> None:
    """A's run directories, and J's chain through its source's identity, on a machine whose `auto` decided `decided`:
    a change here stops finished runs from being reused (results/fashion-mnist-cpu holds their evidence), so it must
    be deliberate."""
    from fastmem.cpu_precision import DECISION_ENV, CpuPrecisionChoice, cpu_precision_choice, machine_identity

    monkeypatch.setenv(DECISION_ENV, CpuPrecisionChoice(decided, "test", machine_identity()).to_env())
    cpu_precision_choice.cache_clear()
    try:
        a = {r.variant.label: r.run_dir.name for r in plan_experiment(EXPERIMENTS["A"], "cpu", tmp_path, {})}
        j = {r.variant.label: r.run_dir.name for r in plan_experiment(EXPERIMENTS["J"], "cpu", tmp_path, {})}
    finally:
        cpu_precision_choice.cache_clear()
    # A's random-label runs at the cpu scale are the main job's (the same resolved config): one training serves both.
    assert a == PINNED[decided][0]
    assert j["reset stage4,head"] == PINNED[decided][1]


def _run_dirs(tmp_path: Path, overrides: dict) -> list[str]:
    return [r.run_dir.name for r in plan_experiment(EXPERIMENTS["A"], "smoke", tmp_path, overrides)]


def test_identity_is_the_resolved_config_and_the_run_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _run_dirs(tmp_path, {})
    # Execution-only knobs (config.py metadata `execution`) leave it alone; a knob set to its default changes nothing.
    assert _run_dirs(tmp_path, {"threads": 2, "progress": True, "workers": 3, "checkpoint_every": 7}) == base
    assert _run_dirs(tmp_path, {"probe_k": TrainConfig().probe_k, "momentum": TrainConfig().momentum}) == base
    # A knob that changes results, given or as a changed default, plans other directories.
    assert not set(_run_dirs(tmp_path, {"probe_k": TrainConfig().probe_k + 1})) & set(base)
    # A changed default of a knob no spec names (weight_decay): the resolved config sees it.
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    defaults = list(TrainConfig.__init__.__defaults__)
    defaults[names.index("weight_decay")] = 1e-4
    with monkeypatch.context() as patched:
        patched.setattr(TrainConfig.__init__, "__defaults__", tuple(defaults))
        assert TrainConfig().weight_decay == 1e-4
        assert not set(_run_dirs(tmp_path, {})) & set(base)
    assert _run_dirs(tmp_path, {}) == base
    # So does a new code/format version.
    monkeypatch.setattr(sweep, "RUN_FORMAT", sweep.RUN_FORMAT + "+1")
    assert not set(_run_dirs(tmp_path, {})) & set(base)


def test_a_run_directory_holding_another_run_is_refused_before_anything_starts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = plan_experiment(EXPERIMENTS["A"], "smoke", out, {})[0]
    run.run_dir.mkdir(parents=True)
    foreign = {**run.config.to_dict(), "lr": 0.1}  # a finished run of another recipe under this run's name
    (run.run_dir / "config.json").write_text(json.dumps(foreign))
    (run.run_dir / "summary.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in run.run_dir.iterdir()}
    result = run_module("fastmem.experiments", "run", "A", "--scale", "smoke", "--out", str(out), "--no-report")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{run.run_dir / 'config.json'}: this run directory holds another run (lr 0.1 (planned 0.0003))" in result.stderr
    assert {p.name: p.read_bytes() for p in run.run_dir.iterdir()} == before
    assert sorted(p.name for p in (out / "runs").iterdir()) == [run.run_dir.name]  # nothing else started


def test_a_spec_with_an_unknown_knob_is_rejected_when_planned(tmp_path: Path) -> None:
    bad = Experiment("X", "bad", "nothing", "nothing", lambda scale: [Variant("v", {"augmnt": "full"})])
    with pytest.raises(FastmemError, match="unknown knob"):
        plan_experiment(bad, "smoke", tmp_path, {})


def test_report_of_a_folder_without_a_sweep_is_one_clear_error(tmp_path: Path) -> None:
    result = run_module("fastmem.report", str(tmp_path))
    assert result.returncode == 2 and "not a sweep folder" in result.stderr
