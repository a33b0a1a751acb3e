"""File hygiene: stale temporary files are cleared under the lock, atomic writes fsync file then directory,
leave nothing behind on failure, and give outputs the mode 0o666 less the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmem.io_utils import atomic_path, is_fastmem_temp, write_json_atomic
from fastmem.probe.cache import CacheKey, EmbeddingCache
from fastmem.probe.extract import Embedding
from fastmem.run.checkpoint import save_checkpoint
from fastmem.run.lock import LOCK_NAME, hold_run_lock, remove_stale_temps
from fastmem.run.metrics import MetricsLogger


@pytest.mark.parametrize(("name", "temp"), [
    (".config.json.k2x9_q0a.tmp", True),  # tempfile.mkstemp's names (earlier versions)
    (".checkpoint.pt.0a1b2c3d.tmp", True),  # atomic_path's names
    (".engine.4242.tmp.ep", True),  # the TensorRT engine cache's
    ("config.json", False), ("notes.tmp", False), (".config.json.tmp", False), ("tmpab12cd34.tmp", False),
    (".checkpoint.pt.0a1b2c3d.tmp.bak", False), (LOCK_NAME, False),
])
def test_fastmem_temp_names(name: str, temp: bool) -> None:
    assert is_fastmem_temp(name) is temp


def test_stale_temps_are_removed_and_foreign_files_kept(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    stale = [run_dir / ".checkpoint.pt.k2x9_q0a.tmp", run_dir / ".config.json.0a1b2c3d.tmp",
             run_dir / "embeddings" / "w" / "d-train" / ".h.mean.npy.abcdefgh.tmp", run_dir / "trt" / ".h.77.tmp.ep"]
    foreign = [run_dir / "notes.tmp", run_dir / "config.json", run_dir / ".config.json.tmp", run_dir / "my.tmp.txt",
               run_dir / "inner" / LOCK_NAME, run_dir / "inner" / ".summary.json.0a1b2c3d.tmp"]  # another lock's domain
    for path in stale + foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    with hold_run_lock(run_dir):
        assert remove_stale_temps(run_dir) == sorted(stale)
        assert remove_stale_temps(run_dir) == []
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in foreign)


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_get_0666_less_the_umask(tmp_path: Path, umask: int) -> None:
    expected = 0o666 & ~umask  # 0644 under 022, 0640 under 027
    write_json_atomic(tmp_path / "summary.json", {"a": 1})
    save_checkpoint(tmp_path / "checkpoint.pt", {"model": {"w": torch.zeros(2)}, "epoch": 1})
    metrics = MetricsLogger(tmp_path)
    metrics.log({"epoch": 1, "loss": 0.5})
    metrics.truncate_after(1)  # rewritten atomically
    vectors = np.ones((4, 3), dtype=np.float32)
    EmbeddingCache(tmp_path / "embeddings").put(CacheKey("w", "d", "train", "h", "mean"),
                                                Embedding(vectors, np.linalg.norm(vectors, axis=1)))
    with hold_run_lock(tmp_path / "locked"):
        pass
    written = [tmp_path / "summary.json", tmp_path / "checkpoint.pt", tmp_path / "metrics.jsonl",
               tmp_path / "locked" / LOCK_NAME, *sorted((tmp_path / "embeddings").rglob("*.*"))]
    assert len(written) == 7
    assert {str(p.relative_to(tmp_path)): oct(mode_of(p)) for p in written} == \
        {str(p.relative_to(tmp_path)): oct(expected) for p in written}


def test_a_failed_atomic_write_leaves_no_temp_and_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    write_json_atomic(target, {"old": True})
    with pytest.raises(ZeroDivisionError), atomic_path(target) as tmp:
        tmp.write_text("half a file")
        1 / 0  # noqa: B018
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert target.read_text() == '{\n  "old": true\n}\n'


def test_an_atomic_replace_fsyncs_the_file_then_its_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    replaced: list[int] = []
    real_replace = os.replace

    def recording_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        replaced.append(len(synced))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    write_json_atomic(tmp_path / "sub" / "config.json", {"a": 1})
    assert synced == ["file", "dir"] and replaced == [1]  # file synced before the rename, directory after
