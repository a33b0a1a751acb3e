"""Per-epoch metrics: one JSON object per line in metrics.jsonl, optionally mirrored to TensorBoard.

The one writer (`MetricsLogger`) and the one reader (`read_metrics`, `RunRecords`) of the format: a
training record has `epoch`, `loss`, `train_acc_random`, …; a probe adds one `knn/<probe point>` key
per layer. Plots, reports, the demo and the sweep read records only through `RunRecords`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


KNN_PREFIX = "knn/"


def knn_key(layer: str) -> str:
    """The record key of a probe point's k-NN accuracy."""
    return KNN_PREFIX + layer


def knn_of(record: Mapping[str, Any]) -> dict[str, float]:
    """A record's k-NN accuracies by probe point, in probe order (empty for an unprobed epoch)."""
    return {key[len(KNN_PREFIX):]: value for key, value in record.items() if key.startswith(KNN_PREFIX)}


@dataclass(frozen=True)
class RunRecords:
    """A run's metrics records, with the views every reader needs."""

    records: Sequence[Mapping[str, Any]]

    @classmethod
    def read(cls, run_dir: str | Path) -> RunRecords:
        """The records of RUN_DIR/metrics.jsonl (none if it does not exist)."""
        return cls(read_metrics(Path(run_dir) / "metrics.jsonl"))

    @property
    def probes(self) -> list[Mapping[str, Any]]:
        """The records that carry a k-NN probe, by epoch."""
        return [r for r in self.records if knn_of(r)]

    @property
    def layers(self) -> list[str]:
        """Probe-point names, in probe order."""
        probes = self.probes
        return list(knn_of(probes[0])) if probes else []

    @property
    def last_epoch(self) -> int:
        """The latest epoch with a record (0 before the first epoch ends)."""
        return max((int(r.get("epoch", 0)) for r in self.records), default=0)

    @property
    def fits(self) -> list[Mapping[str, Any]]:
        """The training records (those with the fit of the training labels)."""
        return [r for r in self.records if "train_acc_random" in r]

    @property
    def final_fit(self) -> float | None:
        """The fit of the training labels over the last epoch trained."""
        fits = self.fits
        return fits[-1]["train_acc_random"] if fits else None

    @property
    def final_agree(self) -> float | None:
        """How often the last epoch's predictions equal the true labels, where recorded."""
        fits = self.fits
        return fits[-1].get("train_acc_true") if fits else None

    def fit_curve(self) -> list[tuple[int, float]]:
        """(epoch, fit of the training labels) per training record."""
        return [(int(r["epoch"]), r["train_acc_random"]) for r in self.fits]

    @property
    def final_probe_epoch(self) -> int | None:
        """The epoch of the last probe."""
        probes = self.probes
        return int(probes[-1]["epoch"]) if probes else None

    @property
    def untrained(self) -> dict[str, float]:
        """k-NN accuracy by probe point at epoch 0 (the untrained network); empty if not probed."""
        probes = self.probes
        return knn_of(probes[0]) if probes and probes[0].get("epoch") == 0 else {}

    def final_knn(self, layer: str) -> float | None:
        """The layer's k-NN accuracy at the last probe."""
        probes = self.probes
        return knn_of(probes[-1]).get(layer) if probes else None

    def untrained_knn(self, layer: str) -> float | None:
        """The layer's k-NN accuracy at epoch 0 (the untrained network), if it was probed."""
        return self.untrained.get(layer)

    def knn_curve(self, layer: str) -> list[tuple[int, float]]:
        """(epoch, k-NN accuracy) of one probe point at every probe that has it."""
        key = knn_key(layer)
        return [(int(r["epoch"]), r[key]) for r in self.probes if key in r]


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
