"""The probe engine: extraction, the embedding cache (hit, miss, invalidation, corruption) and the CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUICK_RUN, run_module
from sklearn.neighbors import KNeighborsClassifier

from fastmem.data.synthetic import make_synthetic
from fastmem.models import create_model
from fastmem.probe import EmbeddingCache, embed_split, extract_embeddings, probe_knn
from fastmem.probe import extract as extract_module


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=10, in_channels=3, image_size=16, width=0.25, bottleneck_dim=64)


def _data():
    train = make_synthetic(300, size=16, seed=0)
    test = make_synthetic(100, size=16, seed=0, split="test")
    return train, test


def test_extraction_stores_unit_float16_vectors_and_fp32_norms() -> None:
    train, _ = _data()
    model = _model()
    embeddings = extract_embeddings(model, train.images, device=torch.device("cpu"), batch_size=128)
    assert tuple(embeddings) == model.probe_points
    assert model.training  # extraction ran in eval mode and restored the training mode
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(train.images[:5]).permute(0, 3, 1, 2).float() / 255
        direct = model.forward_probes(x)
    for name, embedding in embeddings.items():
        assert embedding.vectors.dtype == np.float16 and embedding.norms.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(embedding.vectors.astype(np.float32), axis=1), 1, atol=2e-3)
        np.testing.assert_allclose(embedding.norms[:5], direct[name].norm(dim=1).numpy(), rtol=1e-4)


def test_random_projection_reduces_wide_layers_deterministically() -> None:
    train, _ = _data()
    model = _model()
    a = extract_embeddings(model, train.images, device=torch.device("cpu"), project_dim=16)
    b = extract_embeddings(model, train.images, device=torch.device("cpu"), project_dim=16)
    assert a["head_hidden"].vectors.shape == (300, 16) and a["z"].vectors.shape == (300, 10)  # z is narrower
    assert np.array_equal(a["head_hidden"].vectors, b["head_hidden"].vectors)


def test_probe_accuracy_equals_sklearn_on_the_same_embeddings() -> None:
    train, test = _data()
    model = _model()
    accuracy = probe_knn(model, train.images, train.labels, test.images, test.labels, device=torch.device("cpu"), k=20)
    ref = extract_embeddings(model, train.images, device=torch.device("cpu"))
    qry = extract_embeddings(model, test.images, device=torch.device("cpu"))
    for layer in ("stage2", "h", "z"):
        clf = KNeighborsClassifier(20, metric="cosine", algorithm="brute").fit(ref[layer].vectors.astype(np.float32), train.labels)
        assert accuracy[layer] == pytest.approx((clf.predict(qry[layer].vectors.astype(np.float32)) == test.labels).mean())


def _embed(model, cache, calls: list[str], monkeypatch, dtype: torch.dtype | None = None):
    real = extract_module.extract_embeddings

    def counting(*args, **kwargs):
        calls.append(",".join(kwargs["layers"]))
        return real(*args, **kwargs)

    monkeypatch.setattr("fastmem.probe.extract_embeddings", counting)
    train, _ = _data()
    return embed_split(model, train.images, train.labels, "train", ("h", "z"), device=torch.device("cpu"),
                       dtype=dtype, cache=cache, weights=None, project_dim=0)


def test_cache_hit_miss_and_invalidation_on_new_weights(tmp_path: Path, monkeypatch) -> None:
    cache, calls = EmbeddingCache(tmp_path), []
    first = _embed(_model(0), cache, calls, monkeypatch)
    second = _embed(_model(0), cache, calls, monkeypatch)  # same weights: a hit, no extraction
    assert calls == ["h,z"]
    assert isinstance(second["h"].vectors, np.memmap)
    assert np.array_equal(first["h"].vectors, second["h"].vectors)
    _embed(_model(1), cache, calls, monkeypatch)  # new weights: a miss
    assert calls == ["h,z", "h,z"]


def test_cache_keeps_extraction_precisions_apart(tmp_path: Path, monkeypatch) -> None:
    cache, calls = EmbeddingCache(tmp_path), []
    fp32 = _embed(_model(0), cache, calls, monkeypatch)
    bf16 = _embed(_model(0), cache, calls, monkeypatch, dtype=torch.bfloat16)  # same weights, other precision: a miss
    assert calls == ["h,z", "h,z"]
    assert not np.array_equal(fp32["h"].vectors, bf16["h"].vectors)
    assert np.array_equal(_embed(_model(0), cache, calls, monkeypatch)["h"].vectors, fp32["h"].vectors)
    assert np.array_equal(_embed(_model(0), cache, calls, monkeypatch, dtype=torch.bfloat16)["h"].vectors,
                          bf16["h"].vectors)
    assert calls == ["h,z", "h,z"]  # both entries hit afterwards


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_norms", "garbage_sidecar"])
def test_damaged_cache_entries_are_rebuilt_with_a_warning(tmp_path: Path, monkeypatch, damage: str) -> None:
    cache, calls = EmbeddingCache(tmp_path), []
    first = np.array(_embed(_model(0), cache, calls, monkeypatch)["h"].vectors)  # a copy: the entry maps the file
    sidecar = next(tmp_path.rglob("h.gap.*.json"))  # <layer>.<reduction>.<config digest>.json
    vectors, norms = sidecar.with_suffix(".npy"), sidecar.with_suffix(".norms.npy")
    if damage == "truncate":
        vectors.write_bytes(vectors.read_bytes()[:-100])
    elif damage == "flip_byte":
        blob = bytearray(vectors.read_bytes())
        blob[-7] ^= 0xFF
        vectors.write_bytes(bytes(blob))
    elif damage == "delete_norms":
        norms.unlink()
    else:
        sidecar.write_text("{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = _embed(_model(0), cache, calls, monkeypatch)
    assert calls == ["h,z", "h"]  # only the damaged layer is rebuilt
    assert any("damaged" in str(w.message) for w in caught)
    assert np.array_equal(first, again["h"].vectors)
    assert cache.get is not None and len(_embed(_model(0), cache, calls, monkeypatch)) == 2 and calls == ["h,z", "h"]


def test_probe_cli_prints_a_table_and_writes_json_and_csv(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_module("fastmem.train", *QUICK_RUN, "--epochs", "1", "--probe-every", "-1", "--out", str(out)).returncode == 0
    result = run_module("fastmem.probe", str(out), "--device", "cpu", "--layers", "stage2,h,z")
    assert result.returncode == 0, result.stderr
    assert "probe point" in result.stdout and "\nz " in result.stdout
    payload = json.loads((out / "probe-epoch1-k20-majority.json").read_text())
    assert list(payload["accuracy"]) == ["stage2", "h", "z"] and payload["queries"] == 200
    from fastmem.run.stats import wilson_interval

    for layer, value in payload["accuracy"].items():  # each accuracy with its Wilson interval over the 200 queries
        expected = wilson_interval(round(value * 200), 200)
        assert payload["interval_95"][layer] == pytest.approx([expected.low, expected.high])
        assert f"[{100 * expected.low:.2f}, {100 * expected.high:.2f}]" in result.stdout
    assert (out / "probe-epoch1-k20-majority.csv").read_text().startswith("layer,knn_accuracy")
    again = run_module("fastmem.probe", str(out), "--device", "cpu", "--layers", "stage2,h,z")
    assert json.loads((out / "probe-epoch1-k20-majority.json").read_text())["accuracy"] == payload["accuracy"]
    assert again.returncode == 0


def test_probe_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    result = run_module("fastmem.probe", str(tmp_path))
    assert result.returncode == 2 and result.stderr.strip() == f"fastmem: error: {tmp_path}: not a run directory (no config.json)"
    out = tmp_path / "run"
    assert run_module("fastmem.train", *QUICK_RUN, "--epochs", "1", "--probe-every", "-1", "--out", str(out)).returncode == 0
    result = run_module("fastmem.probe", str(out), "--layers", "nope", "--device", "cpu")
    assert result.returncode == 2 and "unknown probe point(s) nope" in result.stderr
