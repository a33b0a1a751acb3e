"""Probe faults: bounded memory, stale cache keys, damaged cache entries, a full disk during a cache write.

Each fault is real: a child process whose peak RSS is read with getrusage, files truncated, emptied or
overwritten with garbage on disk, a file size limit (RLIMIT_FSIZE) on the probe CLI's process.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUICK_RUN, REPO, run_module

import fastmem
from fastmem.data.synthetic import make_synthetic
from fastmem.models import create_model
from fastmem.probe import EmbeddingCache, EmbeddingCacheWarning, embed_split, extract_embeddings
from fastmem.probe import extract as extract_module

ALL_LAYERS = "stem,stage1,stage2,stage3,stage4,h,head_hidden,z"
RESULT = "probe-epoch1-k20-majority.json"

# ---------------------------------------------------------------------------------------------- memory

MEMORY_CHILD = r"""
import json, resource, sys, tempfile
from pathlib import Path
import torch
from fastmem.data.synthetic import make_synthetic
from fastmem.models import create_model
from fastmem.probe import EmbeddingCache, probe_knn

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

small, rows, queries, width, chunk, batch = map(int, sys.argv[1:])
torch.set_num_threads(1)
torch.manual_seed(0)
model = create_model("small_cnn", num_classes=10, in_channels=3, image_size=16, width=0.25, bottleneck_dim=width)
train, test = make_synthetic(rows, size=16, seed=0), make_synthetic(queries, size=16, seed=0, split="test")
root = Path(tempfile.mkdtemp())
common = dict(device=torch.device("cpu"), k=20, num_classes=10, layers=("head_hidden",), extract_batch_size=batch,
              host_chunk_bytes=chunk)
out = {"imports": peak()}
# The same probe on `small` references: the peak of one batch and one k-NN block, whatever N.
for cache in (EmbeddingCache(root / "small"), None):  # a hit costs less than the miss
    probe_knn(model, train.images[:small], train.labels[:small], test.images, test.labels, cache=cache, **common)
out["small"] = peak()
cache = EmbeddingCache(root / "large")
for name, chosen in (("miss", cache), ("hit", cache), ("no-cache", None)):
    accuracy = probe_knn(model, train.images, train.labels, test.images, test.labels, cache=chosen, **common)
    out[name] = {"peak": peak(), "accuracy": accuracy["head_hidden"]}
print(json.dumps(out))
"""


def test_probe_memory_does_not_grow_with_n_times_d() -> None:
    """Extraction streams into the cache (or a spill file), the cache check and the k-NN read in chunks.

    N = 4096 references × D = 32768 (head_hidden) is 256 MiB of float16 (512 MiB as fp32). After the
    same probe on 512 references (one extraction batch, one k-NN block: the constant part), the peak
    RSS may grow by at most N × D / 4 bytes (64 MiB) for a cache miss, a hit, and the no-cache path;
    extracting into RAM would grow it by more than N × D (measured: 4–29 MiB).
    """
    rows, width = 4096, 32768
    chunk = 64 << 20  # fp32 bytes per k-NN block, and the no-cache spill threshold
    child = subprocess.run([sys.executable, "-c", MEMORY_CHILD, "512", str(rows), "64", str(width), str(chunk), "512"],
                           cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "FASTMEM_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout.splitlines()[-1])
    size = rows * width * 2
    growth = {name: out[name]["peak"] - out["small"] for name in ("miss", "hit", "no-cache")}
    print(f"N x D = {size >> 20} MiB; constant part {(out['small'] - out['imports']) >> 20} MiB over imports; "
          + ", ".join(f"{name} +{value / 2**20:.1f} MiB" for name, value in growth.items()))
    assert all(value < size / 4 for value in growth.values()), growth
    assert out["miss"]["accuracy"] == out["hit"]["accuracy"] == out["no-cache"]["accuracy"]


def test_blocked_knn_equals_the_whole_search(tmp_path: Path) -> None:
    """Blocks of references and queries (memmaps) merge to the single-block top-k, ties included."""
    from fastmem.kernels import knn_topk

    rng = np.random.default_rng(0)
    reference = rng.standard_normal((700, 48)).astype(np.float16)
    reference[350:] = reference[:350]  # exact duplicates across blocks: ties go to the smaller index
    np.save(tmp_path / "ref.npy", reference)
    np.save(tmp_path / "qry.npy", rng.standard_normal((90, 48)).astype(np.float16))
    ref, qry = np.load(tmp_path / "ref.npy", mmap_mode="r"), np.load(tmp_path / "qry.npy", mmap_mode="r")
    for backend in ("cpu", "torch"):
        whole = knn_topk(ref, qry, 25, backend=backend)
        blocked = knn_topk(ref, qry, 25, backend=backend, chunk_bytes=64 * 48 * 4)  # 64-row blocks
        assert torch.equal(whole[1], blocked[1]) and torch.equal(whole[0], blocked[0]), backend


# ---------------------------------------------------------------------------------------------- stale keys


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=10, in_channels=3, image_size=16, width=0.25, bottleneck_dim=64)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the layers each real extraction is asked for."""
    calls: list[str] = []
    real = extract_module.extract_embeddings

    def counting(*args, **kwargs):
        calls.append(",".join(kwargs["layers"]))
        return real(*args, **kwargs)

    monkeypatch.setattr("fastmem.probe.extract_embeddings", counting)
    return calls


TRAIN = make_synthetic(120, size=16, seed=0)


def _embed(cache: EmbeddingCache, labels: np.ndarray | None = None, layers: tuple[str, ...] = ("h", "z"), **options):
    settings = dict(device=torch.device("cpu"), dtype=None, cache=cache, weights=None, project_dim=0, batch_size=64)
    return embed_split(_model(), TRAIN.images, TRAIN.labels if labels is None else labels, "train", layers,
                       **{**settings, **options})


@pytest.mark.parametrize("change", ["dtype", "channels_last", "project_dim", "project_seed", "batch_size", "labels",
                                    "extraction_version", "fastmem_version", "torch_version"])
def test_any_change_of_config_or_code_version_is_a_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        change: str) -> None:
    cache, calls = EmbeddingCache(tmp_path), _counting(monkeypatch)
    _embed(cache)
    _embed(cache)
    assert calls == ["h,z"]  # unchanged: a hit
    options: dict = {"dtype": {"dtype": torch.bfloat16}, "channels_last": {"channels_last": False},
                     "project_dim": {"project_dim": 8}, "project_seed": {"project_dim": 8, "project_seed": 0},
                     "batch_size": {"batch_size": 32}, "labels": {"labels": (TRAIN.labels + 1) % 10}}.get(change, {})
    if change == "project_seed":
        _embed(cache, **options)  # project_dim 8, seed 0 cached first
        options = {"project_dim": 8, "project_seed": 1}
    if change == "extraction_version":
        monkeypatch.setattr(extract_module, "EXTRACTION_VERSION", extract_module.EXTRACTION_VERSION + 1)
    elif change == "fastmem_version":
        monkeypatch.setattr(fastmem, "__version__", fastmem.__version__ + ".post1")
    elif change == "torch_version":
        monkeypatch.setattr(torch, "__version__", "0.0.0")
    _embed(cache, **options)
    assert calls[-1] == "h,z" and len(calls) == (3 if change == "project_seed" else 2)


def test_the_format_version_and_backend_are_in_the_key(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    first = _embed(cache)
    key = next(iter(json.loads(p.read_text())["key"] for p in tmp_path.rglob("h.*.json")))
    from fastmem.probe import CacheKey

    stored = CacheKey(**key)
    assert cache.get(stored) is not None and np.array_equal(cache.get(stored).vectors, first["h"].vectors)
    assert cache.get(replace(stored, format=stored.format + 1)) is None  # another format: another entry
    config = extract_module.ExtractionConfig.resolve(dtype=None, channels_last=True, project_dim=0, project_seed=0,
                                                     trt=False, batch_size=64, device=torch.device("cpu"))
    assert stored.config == config.digest()
    assert replace(config, backend="trt").digest() != config.digest() != replace(config, device="cuda").digest()


# ---------------------------------------------------------------------------------------------- damaged entries


def _entry(root: Path, layer: str) -> tuple[Path, Path, Path]:
    sidecar = next(root.rglob(f"{layer}.gap*.json"))
    return sidecar.with_suffix(".npy"), sidecar.with_suffix(".norms.npy"), sidecar


def _damage(root: Path, layer: str, how: str) -> Path:
    """Damage one entry of `layer` on disk the way `how` says; returns the file a warning must name."""
    vectors, norms, sidecar = _entry(root, layer)
    if how == "truncated npy":
        vectors.write_bytes(vectors.read_bytes()[:-50])
    elif how == "0-byte npy":
        vectors.write_bytes(b"")
        return vectors
    elif how == "garbage npy":
        vectors.write_bytes(os.urandom(vectors.stat().st_size))
    elif how == "pickled npy":  # unpickling it would create UNPICKLED beside it
        np.save(vectors, np.array([_Unpickled(vectors.parent / "UNPICKLED")], dtype=object), allow_pickle=True)
    elif how == "other array npy":
        np.save(vectors, np.zeros((3, 4), dtype=np.float16))
    elif how == "0-byte norms":
        norms.write_bytes(b"")
        return norms
    elif how == "directory for npy":
        vectors.unlink()
        vectors.mkdir()
    elif how == "0-byte sidecar":
        sidecar.write_bytes(b"")
        return sidecar
    elif how == "garbage sidecar":
        sidecar.write_bytes(os.urandom(200))
        return sidecar
    elif how == "json list sidecar":
        sidecar.write_text("[1, 2]")
        return sidecar
    elif how == "another entry's sidecar":
        sidecar.write_bytes(_entry(root, "h" if layer != "h" else "z")[2].read_bytes())
        return sidecar
    return vectors


DAMAGES = ["truncated npy", "0-byte npy", "garbage npy", "pickled npy", "other array npy", "0-byte norms",
           "directory for npy", "0-byte sidecar", "garbage sidecar", "json list sidecar", "another entry's sidecar"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_entry_warns_naming_the_file_and_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              how: str) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    _embed(cache)
    foreign = tmp_path / "cache" / "notes.npy"
    foreign.write_bytes(b"not ours")
    named = _damage(tmp_path / "cache", "z", how)
    calls = _counting(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = _embed(cache)
    messages = [str(w.message) for w in caught if issubclass(w.category, EmbeddingCacheWarning)]
    assert messages and str(named) in messages[0] and "rebuilding it" in messages[0], messages
    if how == "directory for npy":  # the rebuild cannot replace a directory: a second warning, then RAM
        assert calls == ["z", "z"] and len(messages) == 2 and "could not write the embedding cache" in messages[1]
    else:
        assert calls == ["z"] and len(messages) == 1  # only the damaged layer is extracted again
    fresh = extract_embeddings(_model(), TRAIN.images, device=torch.device("cpu"), layers=("h", "z"), batch_size=64)
    for layer in ("h", "z"):
        assert np.array_equal(again[layer].vectors, fresh[layer].vectors)
        assert np.array_equal(again[layer].norms, fresh[layer].norms)
    assert foreign.read_bytes() == b"not ours"
    assert not list((tmp_path / "cache").rglob("UNPICKLED"))
    if how != "directory for npy":  # the rebuilt entry is whole: the next read is a hit, with no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _embed(cache)
        assert calls == ["z"]


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, precision_flags: list[str]) -> Path:
    """A one-epoch run in each of conftest's precisions; the probe CLI extracts in what the run recorded."""
    out = tmp_path_factory.mktemp("faults") / "run"
    result = run_module("fastmem.train", *QUICK_RUN, *precision_flags, "--epochs", "1", "--probe-every", "-1",
                        "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def _probe(run_dir: Path, *args: str, file_size_limit: int | None = None) -> tuple[subprocess.CompletedProcess[str], dict]:
    def limit() -> None:  # in the child, before exec: a write past the limit fails with EFBIG (no SIGXFSZ kill)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    env = {**os.environ, "FASTMEM_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "fastmem.probe", str(run_dir), "--device", "cpu", *args],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                            preexec_fn=limit if file_size_limit is not None else None)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result, json.loads((run_dir / RESULT).read_text())["accuracy"]


@pytest.fixture(scope="module")
def uncached_accuracy(trained_run: Path) -> dict:
    return _probe(trained_run, "--no-cache")[1]


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file's bytes, but the lock's (it holds the last holder's pid)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_probe_cli_rebuilds_damaged_entries_with_one_warning_line_each(trained_run: Path, uncached_accuracy: dict,
                                                                      tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _, cached = _probe(trained_run, "--cache-dir", str(cache))
    assert cached == uncached_accuracy
    foreign = cache / "README.txt"
    foreign.write_text("my notes")
    named = [_damage(cache, layer, how) for layer, how in (
        ("stem", "truncated npy"), ("stage1", "0-byte npy"), ("stage2", "garbage npy"), ("stage3", "0-byte sidecar"),
        ("stage4", "garbage sidecar"), ("h", "0-byte norms"), ("z", "another entry's sidecar"))]
    result, accuracy = _probe(trained_run, "--cache-dir", str(cache))
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(named) and all(line.startswith("fastmem: warning: embedding cache entry ") for line in lines)
    assert all(any(str(path) in line for line in lines) for path in named), lines
    assert accuracy == uncached_accuracy
    assert foreign.read_text() == "my notes"


def test_probe_cli_on_a_full_disk_warns_once_and_answers_without_the_cache(trained_run: Path, uncached_accuracy: dict,
                                                                           tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _probe(trained_run, "--cache-dir", str(cache), "--layers", "stem,h,z")  # entries that must survive
    before = _snapshot(cache)
    # 64 KiB per file: the small layers' entries fit, head_hidden's train vectors (256 x 256 fp16) do not.
    result, accuracy = _probe(trained_run, "--cache-dir", str(cache), file_size_limit=64 << 10)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastmem: warning: could not write the embedding cache ("), lines
    assert "head_hidden" in lines[0] and "File too large" in lines[0]
    assert accuracy == uncached_accuracy
    assert _snapshot(cache) == before  # nothing new committed, nothing old touched, no temp file left
    assert not [p for p in trained_run.rglob("*") if p.name.endswith(".tmp")]
    result, cached = _probe(trained_run, "--cache-dir", str(cache))  # the disk is back: the cache fills
    assert result.stderr == "" and cached == accuracy


class _Unpickled:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))
