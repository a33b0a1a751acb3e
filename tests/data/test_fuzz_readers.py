"""Issue 13 item 9: a hypothesis fuzz of every reader of a file fastmem did not just write itself.

Each reader gets a valid file mutated (bytes flipped, overwritten, inserted, deleted, the file cut short)
or pure garbage, and must return a valid result or raise a FastmemError whose message is one line naming
the file: never another exception, never a hang (a per-example deadline, and a timeout per test), never a
pickle executed (pickles whose `__reduce__` would create a marker file are planted, mutated, and the
marker must never appear). Bounded and derandomized in CI (the whole file well under 45 s on 2 cores);
`pytest tests/data/test_fuzz_readers.py --fuzz-minutes N` (or FASTMEM_FUZZ_MINUTES=N) fuzzes for about N
minutes in all with fresh random examples. Each test prints its example count and time (`-s` shows them).
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmem.data.cifar import _py2_pickle, load_cifar, write_cifar
from fastmem.data.idx import read_idx_images, write_idx_images
from fastmem.data.imagefolder import decode_image, load_imagefolder
from fastmem.data.labels import load_labels, make_targets, save_labels
from fastmem.errors import FastmemError
from fastmem.run.checkpoint import (
    capture_rng_state,
    check_resumable,
    checkpoint_config,
    load_checkpoint,
    save_checkpoint,
)
from fastmem.run.config import TrainConfig, load_run_config
from fastmem.run.metrics import MetricsLogger, read_metrics
from fastmem.run.predictions import read_predictions, write_predictions

# Examples per reader in CI (derandomized: the same examples every run), chosen to keep the file under 45 s.
CI_EXAMPLES = {"idx": 200, "cifar": 200, "image": 120, "annotations": 100, "labels": 200, "config": 200,
               "metrics": 150, "checkpoint": 150, "beton": 100, "predictions": 150}
DEADLINE = timedelta(seconds=5)  # per example; a damaged file that makes a reader spin fails here
pytestmark = pytest.mark.timeout(300)


def _apply(base: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    data = bytearray(base)
    for op in ops:
        at = min(op[1], len(data))
        if op[0] == "cut":
            del data[at:]
        elif op[0] == "flip" and at < len(data):
            data[at] ^= op[2]
        elif op[0] == "write":
            data[at:at + len(op[2])] = op[2]
        elif op[0] == "insert":
            data[at:at] = op[2]
        elif op[0] == "delete":
            del data[at:at + op[2]]
    return bytes(data)


def damaged(*bases: bytes, garbage_size: int = 4096) -> st.SearchStrategy[bytes]:
    """A valid file mutated 1-4 times, or pure garbage."""
    size = max(len(b) for b in bases)  # positions anywhere, and more often in the header and at the end (tables)
    position = st.one_of(st.integers(0, min(size, 4096)), st.integers(0, size), st.integers(max(0, size - 512), size))
    op = st.one_of(
        st.tuples(st.just("cut"), position),
        st.tuples(st.just("flip"), position, st.integers(1, 255)),
        st.tuples(st.just("write"), position, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), position, st.integers(1, 64)),
    )
    mutated = st.tuples(st.sampled_from(bases), st.lists(op, min_size=1, max_size=4)).map(lambda t: _apply(*t))
    return st.one_of(mutated, mutated, mutated, st.binary(max_size=garbage_size))


def expect_one_line_naming(read: Callable[[], Any], named: Path) -> Any:
    """read() returns, or raises a FastmemError of one line that names `named`; any other exception fails."""
    try:
        return read()
    except FastmemError as err:
        message = str(err)
        assert "\n" not in message and "\r" not in message, message
        assert str(named) in message, message
        return None


def fuzz(request: pytest.FixtureRequest, name: str, strategy: st.SearchStrategy[Any], check: Callable[[Any], None]) -> None:
    """Run `check` on `strategy`'s examples: CI_EXAMPLES[name] derandomized ones, or the --fuzz-minutes share."""
    minutes = request.config.getoption("--fuzz-minutes") or float(os.environ.get("FASTMEM_FUZZ_MINUTES") or 0)
    examples = [0]

    def counted(value: Any) -> None:
        examples[0] += 1
        check(value)

    common = dict(deadline=DEADLINE, database=None, suppress_health_check=list(HealthCheck))
    started = time.monotonic()
    if minutes > 0:
        budget = minutes * 60 / len(CI_EXAMPLES)
        while time.monotonic() - started < budget:
            settings(max_examples=500, **common)(given(strategy)(counted))()
    else:
        settings(max_examples=CI_EXAMPLES[name], derandomize=True, **common)(given(strategy)(counted))()
    print(f"\nfuzz {name}: {examples[0]} examples in {time.monotonic() - started:.1f} s")


class PlantsAFile:
    """A pickled object whose unpickling would create `marker` (if the unpickler let it call os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_idx_files(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    images = np.random.default_rng(0).integers(0, 256, (12, 6, 6), dtype=np.uint8)
    write_idx_images(tmp_path / "raw", images)
    write_idx_images(tmp_path / "packed.gz", images)
    target = tmp_path / "train-images-idx3-ubyte"

    def check(blob: bytes) -> None:
        target.write_bytes(blob)
        result = expect_one_line_naming(lambda: read_idx_images(target), target)
        assert result is None or (result.dtype == np.uint8 and result.ndim == 3)

    fuzz(request, "idx", damaged((tmp_path / "raw").read_bytes(), (tmp_path / "packed.gz").read_bytes()), check)


def test_cifar_pickle_batches_never_run_code(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    rng = np.random.default_rng(0)
    batches = write_cifar(tmp_path, "cifar10", train=(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), np.arange(4)),
                          test=(rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), np.arange(3)))
    marker = tmp_path / "code-ran"
    plants = [pickle.dumps({b"data": PlantsAFile(marker), b"labels": [0]}, protocol=p) for p in (0, 2, 4, 5)]
    plants.append(_py2_pickle({b"data": np.zeros((1, 3072), np.uint8), b"labels": [PlantsAFile(marker)]}))
    bases = [(batches / "test_batch").read_bytes(), (batches / "batches.meta").read_bytes(), *plants]
    originals = {name: (batches / name).read_bytes() for name in ("test_batch", "batches.meta")}

    def check(case: tuple[str, bytes]) -> None:
        member, blob = case
        for name, original in originals.items():
            (batches / name).write_bytes(blob if name == member else original)
        result = expect_one_line_naming(lambda: load_cifar("cifar10", "test", batches), batches / member)
        assert not marker.exists(), "a pickle ran code"
        assert result is None or (result.images.shape[1:] == (32, 32, 3) and len(result.labels) == len(result.images))

    fuzz(request, "cifar", st.tuples(st.sampled_from(sorted(originals)), damaged(*bases)), check)
    assert not marker.exists()


def _image_bytes(kind: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, kind)
    return buffer.getvalue()


def test_imagefolder_images(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    target = tmp_path / "image.png"

    def check(blob: bytes) -> None:
        target.write_bytes(blob)
        result = expect_one_line_naming(lambda: decode_image(str(target), 8), target)
        assert result is None or result.shape == (8, 8, 3)

    fuzz(request, "image", damaged(_image_bytes("PNG"), _image_bytes("JPEG")), check)


def test_imagefolder_val_annotations(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    png = _image_bytes("PNG")
    for cls in ("n01", "n02"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        (tmp_path / "train" / cls / "a.png").write_bytes(png)
    (tmp_path / "val" / "images").mkdir(parents=True)
    for name in ("val_0.png", "val_1.png"):
        (tmp_path / "val" / "images" / name).write_bytes(png)
    annotations = tmp_path / "val" / "val_annotations.txt"
    valid = b"val_0.png\tn01\t0\t0\t8\t8\nval_1.png\tn02\t0\t0\t8\t8\n"

    def check(blob: bytes) -> None:
        annotations.write_bytes(blob)
        result = expect_one_line_naming(lambda: load_imagefolder(tmp_path, "test"), annotations)
        assert result is None or all(Path(f).is_file() for f in result.files)

    fuzz(request, "annotations", damaged(valid, garbage_size=256), check)


def test_labels_npz(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    save_labels(tmp_path / "valid.npz", make_targets(np.arange(40) % 10, 10, 0.5, 0))
    target = tmp_path / "labels.npz"

    def check(blob: bytes) -> None:
        target.write_bytes(blob)
        result = expect_one_line_naming(lambda: load_labels(target), target)
        assert result is None or (result.targets.shape == result.true_labels.shape and result.num_classes >= 1)

    fuzz(request, "labels", damaged((tmp_path / "valid.npz").read_bytes()), check)


def test_probe_predictions_npz(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from collections import OrderedDict

    valid = write_predictions(tmp_path / "valid", 0, OrderedDict(h=np.arange(30) % 10, z=np.arange(30) % 7),
                              np.arange(30) % 10)
    target = tmp_path / "epoch_000000.npz"

    def check(blob: bytes) -> None:
        target.write_bytes(blob)
        result = expect_one_line_naming(lambda: read_predictions(target), target)
        assert result is None or all(p.shape == result[1].shape for p in result[0].values())

    fuzz(request, "predictions", damaged(valid.read_bytes()), check)


def test_config_json(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    valid = json.dumps(TrainConfig().to_dict(), indent=2).encode()
    target = tmp_path / "config.json"

    def check(blob: bytes) -> None:
        target.write_bytes(blob)
        result = expect_one_line_naming(lambda: load_run_config(tmp_path), target)
        assert result is None or isinstance(result, TrainConfig)

    fuzz(request, "config", damaged(valid), check)


def test_metrics_jsonl_reader_and_truncate_after_agree(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    lines = [{"epoch": 0, "knn/z": 0.5}, {"epoch": 1, "loss": 0.1, "train_acc_random": 0.2},
             {"epoch": 2, "loss": 0.05, "train_acc_random": 0.4, "knn/z": 0.6}]
    valid = "".join(json.dumps(r) + "\n" for r in lines).encode()
    target = tmp_path / "metrics.jsonl"
    logger = MetricsLogger(tmp_path)

    def check(blob: bytes) -> None:
        target.write_bytes(blob)
        records = expect_one_line_naming(lambda: read_metrics(target, warn=False), target)
        if records is not None:  # what the reader accepts, the resume's rewrite keeps, and nothing else
            logger.truncate_after(10**9)
            assert read_metrics(target, warn=False) == records

    fuzz(request, "metrics", damaged(valid), check)


def _checkpoint_payload() -> dict[str, Any]:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": {}, "epoch": 1,
            "rng": capture_rng_state(), "config": json.dumps(TrainConfig().to_dict())}


def test_checkpoints_never_run_code(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    marker = tmp_path / "code-ran"
    save_checkpoint(tmp_path / "valid.pt", _checkpoint_payload())
    torch.save({"model": PlantsAFile(marker), "epoch": 1}, tmp_path / "planted.pt")
    target = tmp_path / "checkpoint.pt"

    def read() -> dict[str, Any]:
        payload = load_checkpoint(target)
        check_resumable(payload, target)
        checkpoint_config(payload, target)
        return payload

    def check(blob: bytes) -> None:
        target.write_bytes(blob)
        expect_one_line_naming(read, target)
        assert not marker.exists(), "a pickle ran code"

    fuzz(request, "checkpoint", damaged((tmp_path / "valid.pt").read_bytes(), (tmp_path / "planted.pt").read_bytes()),
         check)


def test_beton_headers(tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastmem.pipelines.ffcv import import_ffcv, read_beton_header

    try:
        ffcv = import_ffcv()
    except FastmemError as missing:
        pytest.skip(str(missing))
    monkeypatch.setattr(ffcv.writer, "tqdm", functools.partial(ffcv.writer.tqdm, disable=True))
    bases = []
    for name, image_field in (("raw", ffcv.fields.NDArrayField(np.dtype("uint8"), (4, 4, 3))),
                              ("jpeg", ffcv.fields.RGBImageField(write_mode="jpg"))):
        writer = ffcv.writer.DatasetWriter(str(tmp_path / f"{name}.beton"), {"image": image_field, "label": ffcv.fields.IntField()},
                                           page_size=1 << 21, num_workers=1)  # FFCV's smallest page
        images = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
        writer.from_indexed_dataset([(images[i], i) for i in range(6)], chunksize=6)
        bases.append((tmp_path / f"{name}.beton").read_bytes())
    target = tmp_path / "given.beton"

    def check(blob: bytes) -> None:
        target.write_bytes(blob)
        header = expect_one_line_naming(lambda: read_beton_header(target), target)
        if header is not None:  # what the check passes, FFCV's reader opens
            reader = ffcv.reader.Reader(str(target))
            assert int(reader.num_samples) == header.num_samples

    fuzz(request, "beton", damaged(*bases), check)
