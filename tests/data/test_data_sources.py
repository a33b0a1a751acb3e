"""Data sources: exact round trips through the real file formats, real Fashion-MNIST, synthetic data, bad input."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastmem.data import DATASET_NAMES, ArrayDataset, FileDataset, load_arrays, load_dataset
from fastmem.data.cifar import load_cifar, write_cifar
from fastmem.data.idx import (
    FASHION_MNIST_CLASSES,
    find_fashion_mnist_dir,
    load_fashion_mnist,
    read_idx_images,
    read_idx_labels,
    write_idx_images,
    write_idx_labels,
)
from fastmem.data.imagefolder import decode_files, load_imagefolder
from fastmem.data.synthetic import make_synthetic
from fastmem.errors import FastmemError

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _offline_and_isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test touches the network, the user's cache or a user's $FASTMEM_DATA."""
    monkeypatch.setenv("FASTMEM_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("FASTMEM_DATA", raising=False)


def _rng_images(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _write_fmnist(directory: Path, n_train: int = 30, n_test: int = 20, gz: bool = True) -> dict[str, tuple]:
    """Write all four Fashion-MNIST IDX files; return the arrays written per split."""
    suffix = ".gz" if gz else ""
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = _rng_images(n, (28, 28), seed=n)
        labels = np.arange(n) % 10
        write_idx_images(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx_labels(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        out[split] = (images, labels)
    return out


# ---------------------------------------------------------------- IDX / Fashion-MNIST


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_round_trip_exactly_raw_and_gzipped(tmp_path: Path, gz: bool) -> None:
    written = _write_fmnist(tmp_path, gz=gz)
    for split in ("train", "test"):
        ds = load_fashion_mnist(split, tmp_path)
        images, labels = written[split]
        assert ds.images.shape == (len(images), 28, 28, 1) and ds.images.dtype == np.uint8
        np.testing.assert_array_equal(ds.images[..., 0], images)
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.labels.dtype == np.int64 and ds.class_names == FASHION_MNIST_CLASSES


def test_idx_writer_emits_the_standard_header(tmp_path: Path) -> None:
    write_idx_images(tmp_path / "imgs", np.zeros((2, 3, 4), np.uint8))
    write_idx_labels(tmp_path / "labels.gz", np.array([1, 2]))
    assert (tmp_path / "imgs").read_bytes()[:16] == bytes.fromhex("00000803 00000002 00000003 00000004")
    assert gzip.decompress((tmp_path / "labels.gz").read_bytes()) == bytes.fromhex("00000801 00000002 0102")


def test_fashion_mnist_found_in_data_dir_subfolder_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_fmnist(tmp_path / "fashion-mnist")
    assert find_fashion_mnist_dir(tmp_path, download=None, system_dirs=()) == tmp_path / "fashion-mnist"
    monkeypatch.setenv("FASTMEM_DATA", str(tmp_path))
    assert find_fashion_mnist_dir(None, download=None, system_dirs=()) == tmp_path / "fashion-mnist"


def test_fashion_mnist_missing_everywhere_lists_places_and_suggests_install(tmp_path: Path) -> None:
    with pytest.raises(FastmemError) as err:
        find_fashion_mnist_dir(tmp_path / "nowhere", system_dirs=())
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message and "\n" not in message


def test_fashion_mnist_downloader_is_injected_and_offline_env_disables_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def fake_download(target: Path) -> None:
        calls.append(target)
        _write_fmnist(target)

    with pytest.raises(FastmemError):
        find_fashion_mnist_dir(tmp_path / "empty", download=fake_download, system_dirs=())
    assert calls == []  # FASTMEM_OFFLINE=1 from the fixture
    monkeypatch.setenv("FASTMEM_OFFLINE", "0")
    found = find_fashion_mnist_dir(tmp_path / "empty", download=fake_download, system_dirs=())
    assert calls == [found] and found == tmp_path / "xdg-cache" / "fastmem" / "fashion-mnist"
    assert len(load_fashion_mnist("test", found)) == 20


def test_fashion_mnist_failed_download_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTMEM_OFFLINE", "0")

    def broken(target: Path) -> None:
        raise OSError("network unreachable")

    with pytest.raises(FastmemError, match="network unreachable.*dataset-fashion-mnist"):
        find_fashion_mnist_dir(tmp_path, download=broken, system_dirs=())


def test_idx_missing_label_file_is_named(tmp_path: Path) -> None:
    _write_fmnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FastmemError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist("test", tmp_path)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda b: bytes.fromhex("00000804") + b[4:], "wrong magic number 2052"),
        (lambda b: bytes.fromhex("00000903") + b[4:], "data type 0x09"),
        (lambda b: b"\x12\x34" + b[2:], "wrong magic number"),
        (lambda b: b[:-5], "truncated"),
        (lambda b: b[:10], "truncated IDX header"),
        (lambda b: b + b"\0", "beyond"),
    ],
)
def test_idx_bad_header_or_size_is_named(tmp_path: Path, mutate, reason: str) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx_images(path, _rng_images(4, (5, 5)))
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(FastmemError, match=reason) as err:
        read_idx_images(path)
    assert str(path) in str(err.value)


def test_idx_labels_file_passed_as_images_is_a_magic_error(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    write_idx_labels(path, np.arange(5))
    with pytest.raises(FastmemError, match=f"{path}: wrong magic number 2049 \\(expected 2051"):
        read_idx_images(path)


def test_idx_truncated_gzip_is_named(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx_images(path, _rng_images(50, (28, 28)))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FastmemError, match="corrupt or truncated gzip") as err:
        read_idx_images(path)
    assert str(path) in str(err.value)


def test_idx_label_image_count_mismatch_is_named(tmp_path: Path) -> None:
    _write_fmnist(tmp_path)
    write_idx_labels(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    with pytest.raises(FastmemError, match="29 labels but .*train-images-idx3-ubyte.gz holds 30") as err:
        load_fashion_mnist("train", tmp_path)
    assert str(tmp_path / "train-labels-idx1-ubyte.gz") in str(err.value)


def test_idx_label_out_of_range_is_named(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    write_idx_labels(path, np.array([0, 3, 10]))
    with pytest.raises(FastmemError, match="label 10 at index 2") as err:
        read_idx_labels(path, num_classes=10)
    assert str(path) in str(err.value)


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist_has_standard_shapes_and_balanced_labels() -> None:
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fmnist", "test")
    assert isinstance(train, ArrayDataset) and isinstance(test, ArrayDataset)
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(train.labels), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(test.labels), np.full(10, 1000))
    assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot"
    assert 60 < train.images.mean() < 90  # Fashion-MNIST's mean pixel is about 72.9


# ---------------------------------------------------------------- CIFAR


def _cifar_arrays(kind: str, n_train: int = 25, n_test: int = 7):
    classes = 10 if kind == "cifar10" else 100
    train = (_rng_images(n_train, (32, 32, 3), 1), np.arange(n_train) * 7 % classes)
    test = (_rng_images(n_test, (32, 32, 3), 2), np.arange(n_test) * 3 % classes)
    names = tuple(f"name_{i}" for i in range(classes))
    return train, test, names


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar_round_trips_exactly_from_directory_and_tar(tmp_path: Path, kind: str, as_tar: bool) -> None:
    train, test, names = _cifar_arrays(kind)
    written = write_cifar(tmp_path, kind, train, test, names, as_tar=as_tar)
    assert written.is_file() == as_tar
    for split, (images, labels) in (("train", train), ("test", test)):
        ds = load_dataset(kind, split, tmp_path)
        assert isinstance(ds, ArrayDataset) and ds.images.shape == (len(images), 32, 32, 3)
        np.testing.assert_array_equal(ds.images, images)
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.class_names == names


def test_cifar_files_match_the_original_pickle_format(tmp_path: Path) -> None:
    train, test, names = _cifar_arrays("cifar10")
    batch_dir = write_cifar(tmp_path, "cifar10", train, test, names)
    assert sorted(p.name for p in batch_dir.iterdir()) == [
        "batches.meta",
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ]
    raw = (batch_dir / "test_batch").read_bytes()
    assert raw[:2] == b"\x80\x02" and b"numpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw
    with open(batch_dir / "test_batch", "rb") as handle:  # the classic loader from the CIFAR web page
        batch = pickle.load(handle, encoding="bytes")
    assert batch[b"data"].shape == (7, 3072) and batch[b"data"].dtype == np.uint8
    assert batch[b"labels"] == [int(v) for v in test[1]]
    np.testing.assert_array_equal(batch[b"data"][:, :1024].reshape(7, 32, 32), test[0][..., 0])  # R plane first
    meta = pickle.load(open(batch_dir / "batches.meta", "rb"), encoding="bytes")
    assert meta[b"label_names"][3] == b"name_3"


def test_cifar_found_through_fastmem_data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train, test, names = _cifar_arrays("cifar100")
    write_cifar(tmp_path / "cifar100", "cifar100", train, test, names, as_tar=True)
    monkeypatch.setenv("FASTMEM_DATA", str(tmp_path))
    assert len(load_cifar("cifar100", "train")) == 25


def test_cifar_not_found_lists_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(FastmemError, match="cifar-10-batches-py/ or cifar-10-python.tar.gz not found") as err:
        load_dataset("cifar10", "train", tmp_path)
    assert str(tmp_path / "cifar-10-python.tar.gz") in str(err.value)


@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar_missing_batch_is_named(tmp_path: Path, as_tar: bool) -> None:
    train, test, names = _cifar_arrays("cifar10")
    batch_dir = write_cifar(tmp_path / "src", "cifar10", train, test, names)
    (batch_dir / "data_batch_3").unlink()
    root = tmp_path / "data"
    root.mkdir()
    if as_tar:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(batch_dir, arcname="cifar-10-batches-py")
        expected = f"{root / 'cifar-10-python.tar.gz'}:cifar-10-batches-py/data_batch_3: missing from the CIFAR archive"
    else:
        batch_dir.rename(root / "cifar-10-batches-py")
        expected = f"{root / 'cifar-10-batches-py' / 'data_batch_3'}: missing CIFAR file"
    with pytest.raises(FastmemError) as err:
        load_cifar("cifar10", "train", root)
    assert str(err.value) == expected


def test_cifar_truncated_pickle_is_named(tmp_path: Path) -> None:
    train, test, names = _cifar_arrays("cifar10")
    batch_dir = write_cifar(tmp_path, "cifar10", train, test, names)
    blob = (batch_dir / "test_batch").read_bytes()
    (batch_dir / "test_batch").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(FastmemError, match="corrupt or truncated pickle") as err:
        load_cifar("cifar10", "test", tmp_path)
    assert str(batch_dir / "test_batch") in str(err.value)


def test_cifar_truncated_tar_is_named(tmp_path: Path) -> None:
    train, test, names = _cifar_arrays("cifar100", n_train=300)
    tar_path = write_cifar(tmp_path, "cifar100", train, test, names, as_tar=True)
    tar_path.write_bytes(tar_path.read_bytes()[:-2000])
    with pytest.raises(FastmemError) as err:
        load_cifar("cifar100", "train", tmp_path)
    assert str(tar_path) in str(err.value)


def _replace_batch(batch_dir: Path, member: str, batch: dict) -> None:
    (batch_dir / member).write_bytes(pickle.dumps(batch, protocol=4))


def test_cifar_wrong_data_shape_is_named(tmp_path: Path) -> None:
    train, test, names = _cifar_arrays("cifar10")
    batch_dir = write_cifar(tmp_path, "cifar10", train, test, names)
    _replace_batch(batch_dir, "test_batch", {"data": np.zeros((7, 1024), np.uint8), "labels": [0] * 7})
    with pytest.raises(FastmemError, match=r"test_batch: 'data' must be a uint8 N×3072 array"):
        load_cifar("cifar10", "test", tmp_path)


def test_cifar_label_count_mismatch_is_named(tmp_path: Path) -> None:
    train, test, names = _cifar_arrays("cifar10")
    batch_dir = write_cifar(tmp_path, "cifar10", train, test, names)
    _replace_batch(batch_dir, "test_batch", {b"data": np.zeros((7, 3072), np.uint8), b"labels": [0] * 6})
    with pytest.raises(FastmemError, match="test_batch: 6 labels for 7 images"):
        load_cifar("cifar10", "test", tmp_path)


@pytest.mark.parametrize("member", ["batches.meta", "test_batch"])
def test_cifar_pickle_with_disallowed_global_is_refused_without_running_it(tmp_path: Path, member: str) -> None:
    train, test, names = _cifar_arrays("cifar10")
    batch_dir = write_cifar(tmp_path, "cifar10", train, test, names)
    marker = tmp_path / "pwned"
    evil = b"\x80\x02cos\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little")
    evil += f"touch {marker}".encode() + b"\x85R."
    (batch_dir / member).write_bytes(evil)
    with pytest.raises(FastmemError, match="disallowed global os.system") as err:
        load_cifar("cifar10", "test", tmp_path)
    assert str(batch_dir / member) in str(err.value)
    assert not marker.exists()


def test_cifar_tar_with_disallowed_global_names_the_member(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    train, test, names = _cifar_arrays("cifar10")
    batch_dir = write_cifar(tmp_path / "src", "cifar10", train, test, names)
    (batch_dir / "batches.meta").write_bytes(pickle.dumps({b"label_names": Evil()}, protocol=2))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(batch_dir, arcname="cifar-10-batches-py")
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(buffer.getvalue())
    with pytest.raises(FastmemError, match=r"cifar-10-python.tar.gz:cifar-10-batches-py/batches.meta: .*disallowed"):
        load_cifar("cifar10", "train", tmp_path)


# ---------------------------------------------------------------- ImageFolder


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_imagefolder_png_and_jpeg_tree_lists_sorted_classes_and_decodes(tmp_path: Path) -> None:
    pngs = _rng_images(3, (16, 16, 3), 5)
    smooth = np.tile(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], (16, 1, 3))
    for i, image in enumerate(pngs):
        _save(tmp_path / "train" / "zebra" / f"{i}.png", image)
    _save(tmp_path / "train" / "ant" / "a.JPEG", smooth)
    _save(tmp_path / "train" / "ant" / "b.jpg", smooth)
    _save(tmp_path / "val" / "zebra" / "v.png", pngs[0])
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    ds = load_dataset("imagefolder", "train", tmp_path)
    assert isinstance(ds, FileDataset) and ds.class_names == ("ant", "zebra")
    assert [Path(f).name for f in ds.files] == ["a.JPEG", "b.jpg", "0.png", "1.png", "2.png"]
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1, 1])
    arrays = decode_files(ds, size=16)
    np.testing.assert_array_equal(arrays.images[2:], pngs)
    assert np.abs(arrays.images[:2].astype(int) - smooth).mean() < 3  # JPEG is lossy
    val = load_arrays("imagefolder", "test", tmp_path, image_size=8)
    assert val.images.shape == (1, 8, 8, 3) and val.labels.tolist() == [1] and val.class_names == ("ant", "zebra")
    gray = decode_files(ds, size=16, channels=1)
    assert gray.images.shape == (5, 16, 16, 1)


def test_imagefolder_root_holding_class_dirs_is_the_train_split(tmp_path: Path) -> None:
    _save(tmp_path / "cat" / "x.png", _rng_images(1, (8, 8, 3))[0])
    _save(tmp_path / "dog" / "y.png", _rng_images(1, (8, 8, 3))[0])
    ds = load_imagefolder(tmp_path, "train")
    assert ds.class_names == ("cat", "dog") and ds.labels.tolist() == [0, 1]
    assert load_arrays("imagefolder", "train", tmp_path).images.shape == (2, 64, 64, 3)


def test_imagefolder_tiny_imagenet_val_annotations(tmp_path: Path) -> None:
    for wnid in ("n01", "n02"):
        _save(tmp_path / "train" / wnid / "images" / f"{wnid}_0.JPEG", _rng_images(1, (8, 8, 3))[0])
    _save(tmp_path / "val" / "images" / "val_0.JPEG", _rng_images(1, (8, 8, 3))[0])
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t8\t8\n")
    assert load_imagefolder(tmp_path, "train").labels.tolist() == [0, 1]
    val = load_imagefolder(tmp_path, "test")
    assert val.labels.tolist() == [1] and Path(val.files[0]).name == "val_0.JPEG"


def test_imagefolder_corrupt_image_is_named(tmp_path: Path) -> None:
    _save(tmp_path / "train" / "a" / "good.png", _rng_images(1, (8, 8, 3))[0])
    bad = tmp_path / "train" / "b" / "bad.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    ds = load_imagefolder(tmp_path)
    with pytest.raises(FastmemError, match="cannot decode image") as err:
        decode_files(ds, size=8)
    assert str(bad) in str(err.value)


def test_imagefolder_empty_tree_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FastmemError, match="no class directories"):
        load_imagefolder(tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FastmemError, match=f"{tmp_path / 'train'}: no images"):
        load_imagefolder(tmp_path)
    with pytest.raises(FastmemError, match="no val/ or test/"):
        load_imagefolder(tmp_path, "test")
    with pytest.raises(FastmemError, match="needs a data directory"):
        load_dataset("imagefolder")


# ---------------------------------------------------------------- synthetic


def _one_nn_accuracy(train: ArrayDataset, test: ArrayDataset) -> float:
    a = train.images.reshape(len(train), -1).astype(np.float32)
    b = test.images.reshape(len(test), -1).astype(np.float32)
    d2 = (b * b).sum(1)[:, None] - 2 * b @ a.T + (a * a).sum(1)[None, :]
    return float((train.labels[d2.argmin(1)] == test.labels).mean())


def test_synthetic_is_deterministic_with_balanced_labels() -> None:
    a, b = make_synthetic(300, size=16, seed=3), make_synthetic(300, size=16, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.images.shape == (300, 16, 16, 3) and a.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(a.labels), np.full(10, 30))
    assert not np.array_equal(make_synthetic(300, size=16, seed=4).images, a.images)
    assert make_synthetic(5, size=12, channels=1, num_classes=3).images.shape == (5, 12, 12, 1)


def test_synthetic_train_and_test_are_different_samples_of_the_same_classes() -> None:
    train = load_dataset("synthetic", "train", synthetic_size=2000)
    test = load_dataset("synthetic", "test", synthetic_size=2000)
    assert isinstance(train, ArrayDataset) and isinstance(test, ArrayDataset)
    assert len(train) == 2000 and len(test) == 1000 and train.image_shape == (32, 32, 3)
    flat_train = {row.tobytes() for row in train.images.reshape(len(train), -1)}
    assert not any(row.tobytes() in flat_train for row in test.images.reshape(len(test), -1))
    accuracy = _one_nn_accuracy(train, test)
    assert 0.5 < accuracy < 0.99, accuracy  # chance is 0.1: learnable, yet not trivially separable
    assert len(load_dataset("synthetic", "test", synthetic_size=10_000, image_size=8)) == 2000


# ---------------------------------------------------------------- registry


def test_unknown_dataset_name_lists_known_names() -> None:
    with pytest.raises(FastmemError, match="unknown dataset 'mnist-ish'") as err:
        load_dataset("mnist-ish")
    assert all(name in str(err.value) for name in DATASET_NAMES)


def test_bad_split_and_inapplicable_image_size_are_errors() -> None:
    with pytest.raises(FastmemError, match="unknown split 'validation'"):
        load_dataset("synthetic", "validation")
    with pytest.raises(FastmemError, match="image size 64 does not apply"):
        load_dataset("cifar-10", "train", image_size=64)
