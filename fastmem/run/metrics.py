"""Per-epoch metrics: one JSON object per line in metrics.jsonl, optionally mirrored to TensorBoard.

The one writer (`MetricsLogger`) and the one reader (`read_metrics`, `RunRecords`) of the format: a
training record has `epoch`, `loss`, `train_acc_random`, …; a probe adds one `knn/<probe point>` key
per layer. Plots, reports, the demo and the sweep read records only through `RunRecords`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastmem.errors import DiskFullError, disk_full_errno, fail
from fastmem.io_utils import atomic_path


def read_metrics(path: str | Path, *, warn: bool = True) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (an empty list if it does not exist).

    Every line must be a JSON object whose `epoch`, where present, is a count. A torn last line (no final
    newline: an append cut short by a kill or a full disk) is dropped, with a warning on stderr unless
    `warn` is false; an unreadable line anywhere else is a user error naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    try:
        raw = path.read_bytes()
    except OSError as err:
        fail(f"{path}: cannot read metrics ({err.strerror or err})")
    lines = raw.split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record, problem = _parse_record(line)
        if problem is None:
            records.append(record)
        elif number == len(lines):  # the last line and no newline after it: a torn append
            if warn:
                print(f"fastmem: warning: {path}:{number}: dropped a torn last line ({problem}; an interrupted "
                      "write)", file=sys.stderr)
        else:
            fail(f"{path}:{number}: {problem}; not a metrics record")
    return records


def _parse_record(line: bytes) -> tuple[dict[str, Any], str | None]:
    """(record, None) for a valid metrics line, else ({}, what is wrong with it)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return {}, "not UTF-8 text"
    except (ValueError, RecursionError):  # JSONDecodeError, or an integer past Python's digit limit
        return {}, "not a JSON line"
    if not isinstance(record, dict):
        return {}, f"a JSON {type(record).__name__}, not an object"
    epoch = record.get("epoch", 0)
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        return {}, f"epoch {epoch!r} is not a count"
    return record, None


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
        """Drop records past `epoch` (work done after the checkpoint a run resumes from), and a torn last
        line: the file is rewritten to exactly the records `read_metrics` returns up to `epoch`."""
        kept = [r for r in read_metrics(self.path, warn=False) if r.get("epoch", 0) <= epoch]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict[str, Any]) -> None:
        """Append one record as one line; a write that fails (a full disk) is cut back off, leaving the file whole."""
        line = (json.dumps(record) + "\n").encode()
        with open(self.path, "ab", buffering=0) as handle:  # unbuffered: nothing left to flush after a failure
            size = handle.seek(0, 2)
            try:
                written = 0
                while written < len(line):
                    written += handle.write(line[written:])
            except OSError as err:
                handle.truncate(size)  # truncating never needs room; the record is lost, the file is not torn
                code = disk_full_errno(err)
                if code is None:
                    raise
                raise DiskFullError(self.path, code) from err
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
