"""`--precision`: forced either way it is obeyed; `auto` on a CPU is one decision per machine (fastmem/cpu_precision.py),
made from the CPU's flags and a measured step, kept under a lock, handed to child processes and shared by ranks; the run
records what was chosen and why. CPU flags and the measurement are faked here, so every branch runs on every machine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import FAKE_AVX512_BF16_CPUINFO, QUICK_RUN, REPO

from fastmem import cpu_precision
from fastmem.cpu_precision import (
    DECISION_ENV,
    MIN_SPEEDUP,
    CpuPrecisionChoice,
    Measurement,
    cpu_bf16_flags,
    cpu_precision_choice,
    decide,
    decide_once,
    decision_cache,
    machine_identity,
    measure_bf16_speedup,
)
from fastmem.run.config import load_run_config, parse_args
from fastmem.runtime import precision_name, resolve_precision
from fastmem.train import train

CPU = torch.device("cpu")
NO_BF16_CPUINFO = "processor\t: 0\nmodel name\t: fastmem test CPU without bf16\nflags\t\t: fpu sse2 avx2 fma avx512f\n"


@pytest.fixture
def fake_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Point $FASTMEM_CPUINFO at a cpuinfo text; forget this process's kept choice before and after."""
    def use(text: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setenv("FASTMEM_CPUINFO", str(path))
        cpu_precision_choice.cache_clear()

    monkeypatch.delenv(DECISION_ENV, raising=False)
    yield use
    cpu_precision_choice.cache_clear()


class FakeMeasure:
    """A measurement that returns given ratios round by round and counts the measurements started."""

    def __init__(self, *ratios: float, seconds: float = 0.0) -> None:
        self.ratios, self.seconds, self.started, self.calls = list(ratios), seconds, 0, 0

    def __call__(self, rounds: int, previous: Measurement | None = None) -> Measurement:
        if previous is None:
            self.started += 1
        self.calls += 1
        time.sleep(self.seconds)
        done = list(previous.ratios) if previous else []
        for _ in range(rounds):
            done.append(self.ratios[min(len(done), len(self.ratios) - 1)])
        return Measurement(tuple(done))


def test_native_bf16_flags_are_read_from_cpuinfo() -> None:
    amx = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
    assert cpu_bf16_flags(amx) == ("amx_bf16", "avx512_bf16")
    assert cpu_bf16_flags(FAKE_AVX512_BF16_CPUINFO) == ("avx512_bf16",)
    assert cpu_bf16_flags("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n") == ()
    assert cpu_bf16_flags("no flags line at all") == ()


def test_forced_precisions_are_obeyed_on_cpu() -> None:
    assert resolve_precision("fp32", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    assert precision_name(resolve_precision("bf16", CPU)) == "bf16"
    assert precision_name(None) == "fp32"


def test_without_native_bf16_auto_is_fp32_and_nothing_is_measured(fake_cpu) -> None:  # type: ignore[no-untyped-def]
    fake_cpu(NO_BF16_CPUINFO)
    measure = FakeMeasure(3.0)
    choice = decide_once(measure)
    assert (choice.precision, measure.calls) == ("fp32", 0)
    assert "no native bf16" in choice.reason
    assert not decision_cache().exists()  # nothing to keep: the flags decide alone


def test_native_bf16_and_a_faster_step_is_bf16_with_the_figures_in_the_reason(fake_cpu) -> None:  # type: ignore[no-untyped-def]
    fake_cpu(FAKE_AVX512_BF16_CPUINFO)
    choice = decide(("avx512_bf16",), FakeMeasure(1.9, 2.1, 1.8, 2.0, 1.7))
    assert choice.precision == "bf16" and choice.dtype is torch.bfloat16
    assert "median 1.90× over 5 interleaved rounds (range 1.70-2.10×)" in choice.reason
    assert f"≥ {MIN_SPEEDUP}×" in choice.reason and "avx512_bf16" in choice.reason


def test_native_bf16_and_a_step_that_is_not_faster_is_fp32(fake_cpu) -> None:  # type: ignore[no-untyped-def]
    fake_cpu(FAKE_AVX512_BF16_CPUINFO)
    choice = decide(("avx512_bf16",), FakeMeasure(0.6, 0.55, 0.7, 0.5, 0.65))
    assert choice.precision == "fp32" and choice.dtype is None
    assert "median 0.60×" in choice.reason


def test_a_median_near_the_threshold_is_measured_again_and_the_threshold_itself_is_bf16(fake_cpu) -> None:  # type: ignore[no-untyped-def]
    fake_cpu(FAKE_AVX512_BF16_CPUINFO)
    near = FakeMeasure(1.3)  # within the margin: more rounds, up to the cap, then decide on all of them
    choice = decide(("avx512_bf16",), near)
    assert near.calls == cpu_precision.MAX_ROUNDS // cpu_precision.ROUNDS and choice.precision == "bf16"
    assert f"over {cpu_precision.MAX_ROUNDS} interleaved rounds" in choice.reason
    assert decide(("avx512_bf16",), FakeMeasure(MIN_SPEEDUP)).precision == "bf16"
    assert decide(("avx512_bf16",), FakeMeasure(MIN_SPEEDUP - 1e-9)).precision == "fp32"
    settled = FakeMeasure(1.3, 1.3, 1.3, 1.3, 1.3, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0)  # the extra rounds leave the band
    assert decide(("avx512_bf16",), settled).precision == "bf16" and settled.calls == 2


def test_concurrent_first_decisions_wait_for_one_measurement(fake_cpu) -> None:  # type: ignore[no-untyped-def]
    fake_cpu(FAKE_AVX512_BF16_CPUINFO)
    measure = FakeMeasure(1.9, seconds=0.3)
    answers: list[CpuPrecisionChoice] = []
    threads = [threading.Thread(target=lambda: answers.append(decide_once(measure))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert measure.started == 1 and len({a.precision for a in answers}) == 1 and len(answers) == 4
    kept = json.loads(decision_cache().read_text())
    assert kept["cpu"] == machine_identity() and kept["precision"] == "bf16"
    assert decide_once(FakeMeasure(0.5)).precision == "bf16"  # kept: a later, different measurement is not made


def test_two_fresh_processes_on_one_machine_decide_once_and_agree(tmp_path: Path) -> None:
    """Real measurements on the faked CPU: both processes start together; one measures, the other waits and reads."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(FAKE_AVX512_BF16_CPUINFO)
    env = {**os.environ, "FASTMEM_CPUINFO": str(cpuinfo), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop(DECISION_ENV, None)
    code = "from fastmem.cpu_precision import cpu_precision_choice as c; print(c().to_env())"
    processes = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [json.loads(p.communicate(timeout=120)[0]) for p in processes]
    assert outputs[0] == outputs[1] and outputs[0]["precision"] in ("bf16", "fp32")
    assert "interleaved rounds" in outputs[0]["reason"]


def test_a_parents_decision_is_handed_to_its_children(fake_cpu, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    fake_cpu(FAKE_AVX512_BF16_CPUINFO)
    handed = CpuPrecisionChoice("fp32", "fp32: decided by the parent", machine_identity())
    monkeypatch.setenv(DECISION_ENV, handed.to_env())
    assert decide_once(FakeMeasure(3.0)) == handed
    other_machine = CpuPrecisionChoice("fp32", "fp32: another machine's", "some other CPU | avx512_bf16 | torch 0")
    monkeypatch.setenv(DECISION_ENV, other_machine.to_env())
    assert decide_once(FakeMeasure(3.0)).precision == "bf16"  # not this machine's: decided here


def test_the_real_measurement_times_both_precisions() -> None:
    measured = measure_bf16_speedup(rounds=2)
    assert len(measured.ratios) == 2 and all(0.01 < r < 100 for r in measured.ratios)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_precision(rank: int, port: int, decisions: list[str], report: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **{DECISION_ENV: decisions[rank]})
    from fastmem.distributed import distributed_session
    from fastmem.train.build import resolve_run_precision

    with distributed_session():
        dtype, resolved = resolve_run_precision("auto", CPU, {})
    Path(report, f"rank{rank}.json").write_text(json.dumps({"dtype": str(dtype), **resolved}))


def test_two_ranks_that_would_decide_differently_train_in_rank_0s_precision(tmp_path: Path) -> None:
    identity = machine_identity()
    decisions = [CpuPrecisionChoice("bf16", "bf16: rank 0's measurement", identity).to_env(),
                 CpuPrecisionChoice("fp32", "fp32: rank 1's measurement", identity).to_env()]
    mp.spawn(_rank_precision, args=(_free_port(), decisions, str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0] == reports[1]
    assert reports[0] == {"dtype": "torch.bfloat16", "device": "cpu", "precision": "bf16",
                          "precision_reason": "bf16: rank 0's measurement"}


def test_the_run_records_what_auto_chose_and_a_resume_keeps_it(tmp_path: Path, fake_cpu) -> None:  # type: ignore[no-untyped-def]
    fake_cpu(FAKE_AVX512_BF16_CPUINFO)
    run_dir = tmp_path / "run"
    cfg, explicit, resume = parse_args([*QUICK_RUN, "--precision", "auto", "--subset", "128", "--epochs", "1",
                                        "--probe-every", "-1", "--out", str(run_dir)])
    assert cfg.precision == "auto"
    train(cfg, explicit, resume)
    resolved = json.loads((run_dir / "config.json").read_text())["resolved"]
    assert resolved["device"] == "cpu"
    assert resolved["precision"] == cpu_precision_choice().name
    assert resolved["precision_reason"] == cpu_precision_choice().reason
    assert "interleaved rounds" in resolved["precision_reason"]  # measured: the faked CPU declares avx512_bf16
    assert load_run_config(run_dir).precision == "auto"  # the knob stays as asked; `resolved` is beside it
    # A resume continues in what the run began with, even where a fresh `auto` would choose otherwise.
    saved = json.loads((run_dir / "config.json").read_text())
    other = "bf16" if resolved["precision"] == "fp32" else "fp32"
    saved["resolved"]["precision"] = other
    (run_dir / "config.json").write_text(json.dumps(saved))
    cfg, explicit, resume = parse_args(["--resume", str(run_dir), "--epochs", "2", "--progress", "false"])
    train(cfg, explicit, resume)
    assert json.loads((run_dir / "config.json").read_text())["resolved"]["precision"] == other


def test_a_forced_precision_is_recorded_as_requested(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg, explicit, resume = parse_args([*QUICK_RUN, "--subset", "128", "--epochs", "1", "--probe-every", "-1",
                                        "--precision", "bf16", "--out", str(run_dir)])
    train(cfg, explicit, resume)
    resolved = json.loads((run_dir / "config.json").read_text())["resolved"]
    assert resolved == {"device": "cpu", "precision": "bf16", "precision_reason": "bf16: as requested"}


def test_the_probe_cli_extracts_in_the_runs_recorded_precision(tmp_path: Path) -> None:
    from fastmem.probe.__main__ import run_precision
    from fastmem.run.config import RESOLVED_KEY

    run_dir = tmp_path / "run"
    cfg, explicit, resume = parse_args([*QUICK_RUN, "--subset", "128", "--epochs", "1", "--probe-every", "-1",
                                        "--precision", "bf16", "--out", str(run_dir)])
    train(cfg, explicit, resume)
    assert run_precision(run_dir, CPU, None) == "bf16"  # not asked: the run's
    assert run_precision(run_dir, CPU, "fp32") is None  # asked: the flag's
    assert run_precision(run_dir, torch.device("cuda"), None) is None  # another device: its own auto
    assert json.loads((run_dir / "config.json").read_text())[RESOLVED_KEY]["precision"] == "bf16"
