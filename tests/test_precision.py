"""`--precision`: forced either way it is obeyed; `auto` on a CPU is bf16 only with native bf16 and a measured
speed-up, and the run records what was chosen and why."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import QUICK_RUN

from fastmem.run.config import load_run_config, parse_args
from fastmem.runtime import (
    CPU_BF16_MIN_SPEEDUP,
    cpu_bf16_flags,
    cpu_precision_choice,
    measure_cpu_bf16_speedup,
    precision_name,
    resolve_precision,
)
from fastmem.train import train

CPU = torch.device("cpu")


def test_native_bf16_flags_are_read_from_cpuinfo() -> None:
    amx = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
    assert cpu_bf16_flags(amx) == ("amx_bf16", "avx512_bf16")
    assert cpu_bf16_flags("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n") == ()
    assert cpu_bf16_flags("no flags line at all") == ()


def test_forced_precisions_are_obeyed_on_cpu() -> None:
    assert resolve_precision("fp32", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    assert precision_name(resolve_precision("bf16", CPU)) == "bf16"
    assert precision_name(None) == "fp32"


def test_auto_on_this_cpu_follows_its_flags_and_a_measurement() -> None:
    choice = cpu_precision_choice()
    assert resolve_precision("auto", CPU) is choice.dtype
    if not cpu_bf16_flags():
        assert choice.dtype is None and "no native bf16" in choice.reason
    else:  # the reason carries the measured speed-up the choice was made on
        assert ("bf16" if choice.dtype is torch.bfloat16 else "fp32") == choice.name
        assert "measured" in choice.reason and f"{CPU_BF16_MIN_SPEEDUP}" in choice.reason


def test_the_speedup_measurement_times_both_precisions() -> None:
    speedup = measure_cpu_bf16_speedup(repeats=1)
    assert 0.01 < speedup < 100


def test_the_run_records_what_auto_chose_and_a_resume_keeps_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg, explicit, resume = parse_args([*QUICK_RUN, "--subset", "128", "--epochs", "1", "--probe-every", "-1",
                                        "--out", str(run_dir)])
    assert cfg.precision == "auto"
    train(cfg, explicit, resume)
    resolved = json.loads((run_dir / "config.json").read_text())["resolved"]
    assert resolved["device"] == "cpu"
    assert resolved["precision"] == cpu_precision_choice().name
    assert resolved["precision_reason"] == cpu_precision_choice().reason
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
