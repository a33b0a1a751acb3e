"""The main job runs end to end (tiny settings), prints the per-layer table and writes its plot."""

from __future__ import annotations

from pathlib import Path

from conftest import run_module


def test_demo_trains_both_runs_and_writes_table_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = ("--out", str(out), "--dataset", "synthetic", "--subset", "256", "--probe-subset", "200",
            "--epochs", "2", "--probe-every", "1", "--bottleneck-dim", "128", "--batch-size", "64", "--width", "0.25")
    result = run_module("fastmem.demo", *args)
    assert result.returncode == 0, result.stderr
    assert "| probe point | untrained | full augmentation (epoch 2) | no augmentation (epoch 2) |" in result.stdout
    for layer in ("stem", "stage4", "h", "head_hidden", "z"):
        assert f"| {layer} |" in result.stdout
    png = (out / "benign_vs_malign.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "| z |" in (out / "summary.md").read_text()
    # A second invocation reuses the finished runs instead of training again.
    again = run_module("fastmem.demo", *args)
    assert again.returncode == 0 and "untrained" in again.stdout
    assert (out / "random-labels-full-aug" / "train.log").read_text().count("run ") == 1
