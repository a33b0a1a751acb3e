"""Per-epoch metrics: one JSON object per line in metrics.jsonl, optionally mirrored to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastmem.errors import fail
from fastmem.io_utils import atomic_path


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (an empty list if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                fail(f"{path}:{number}: not a JSON line")
    return records


class MetricsLogger:
    """Appends epoch records to metrics.jsonl (and TensorBoard scalars when enabled)."""

    def __init__(self, run_dir: Path, tensorboard: bool = False) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                fail("--tensorboard needs the tensorboard package: pip install tensorboard")
            self.writer = SummaryWriter(str(run_dir / "tb"))

    def truncate_after(self, epoch: int) -> None:
        """Drop records past `epoch` (work done after the checkpoint a run resumes from)."""
        kept = [r for r in read_metrics(self.path) if r.get("epoch", 0) <= epoch]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class DiscardingMetricsLogger(MetricsLogger):
    """The logger of ranks other than 0 under torchrun: logs nothing (rank 0 logs the all-rank totals)."""

    def __init__(self) -> None:
        self.path = Path("/dev/null")
        self.writer = None

    def truncate_after(self, epoch: int) -> None:
        pass

    def log(self, record: dict[str, Any]) -> None:
        pass
