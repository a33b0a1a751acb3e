"""CIFAR batches as users' Python 3 scripts write them: `pickle.dump` at protocols 0-5, numpy 1.x or 2.x module
names, str or bytes keys. They load to the same arrays as the Python 2 originals (`write_cifar`) and as torchvision
reads them; any global outside the numeric-numpy allow-list (code, object arrays) is still refused in one line."""

from __future__ import annotations

import codecs
import io
import os
import pickle
import re
import struct
import tarfile
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fastmem.data import load_dataset
from fastmem.data.cifar import _ALLOWED_GLOBALS, LAYOUTS, load_cifar, safe_unpickle, write_cifar
from fastmem.errors import FastmemError, run_cli

PROTOCOLS = [0, 1, 2, 3, 4, 5]
KINDS = ["cifar10", "cifar100"]
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
_FROMBUFFER = np.ndarray.__reduce_ex__(np.zeros(1), 5)[0]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASTMEM_DATA", raising=False)


def _arrays(kind: str, n_train: int = 12, n_test: int = 5, seed: int = 0):
    classes = 10 if kind == "cifar10" else 100
    rng = np.random.default_rng(seed)
    train = (rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n_train))
    test = (rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n_test))
    return train, test, tuple(f"name_{i}" for i in range(classes))


class _Numpy1Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes numpy's globals under numpy 1.x's module names (numpy.core.*), as files made before numpy 2 have them."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = getattr(obj, "__module__", "") or ""
        if not module.startswith("numpy._core."):
            return super().save_global(obj, name)
        module = module.replace("numpy._core.", "numpy.core.")
        if self.proto >= 4:
            self.save(module)
            self.save(obj.__name__)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{obj.__name__}\n".encode())
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]  # functions go through it, not the method
    dispatch[types.FunctionType] = save_global


def _dump(obj: Any, protocol: int, numpy1: bool = False) -> bytes:
    if not numpy1:
        return pickle.dumps(obj, protocol=protocol)
    buffer = io.BytesIO()
    _Numpy1Pickler(buffer, protocol=protocol).dump(obj)
    return buffer.getvalue()


def _write_py3(root: Path, kind: str, train, test, names, protocol: int, keys: str = "str", labels: str = "list",
               data: str = "array", numpy1: bool = False) -> Path:
    """The batch directory as a user's Python 3 conversion script writes it: `pickle.dump(batch, f, protocol)`."""
    inner, _, train_members, test_member, meta_member, labels_key, names_key = LAYOUTS[kind]
    key = str if keys == "str" else str.encode
    text = str if keys == "str" else str.encode
    target = root / inner
    target.mkdir(parents=True, exist_ok=True)
    for split, (images, targets), members in (("train", train, train_members), ("test", test, (test_member,))):
        rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3 * 32 * 32))  # R, G, B planes
        for index, chunk in enumerate(np.array_split(np.arange(len(rows)), len(members))):
            chunk_labels = np.asarray(targets[chunk], dtype=np.int64)
            label_values = {"list": [int(v) for v in chunk_labels], "numpy": chunk_labels,
                            "numpy-ints": list(chunk_labels)}[labels]
            data_value = {"array": rows[chunk], "bytes": rows[chunk].tobytes(), "list": rows[chunk].tolist()}[data]
            batch = {key("batch_label"): text(f"{split} batch {index + 1}"), key("data"): data_value,
                     key(labels_key): label_values, key("filenames"): [text(f"img_{i}.png") for i in chunk]}
            if kind == "cifar100":
                batch[key("coarse_labels")] = [int(v) // 5 for v in chunk_labels]
            (target / members[index]).write_bytes(_dump(batch, protocol, numpy1))
    meta = {key(names_key): [text(n) for n in names]}
    (target / meta_member).write_bytes(_dump(meta, protocol, numpy1))
    return target


def _assert_loads(root: Path, kind: str, train, test, names) -> None:
    for split, (images, labels) in (("train", train), ("test", test)):
        ds = load_dataset(kind, split, root)
        np.testing.assert_array_equal(ds.images, images)
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.class_names == names


def _torchvision(root: Path, kind: str, train: bool, monkeypatch: pytest.MonkeyPatch):
    """torchvision's CIFAR10/CIFAR100 on `root`, with its md5 checks (of the official files) switched off."""
    tv_cifar = pytest.importorskip("torchvision.datasets.cifar")
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    cls = tv_cifar.CIFAR10 if kind == "cifar10" else tv_cifar.CIFAR100
    monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    return cls(str(root), train=train, download=False)


def _recorded_globals(blob: bytes) -> set[str]:
    """The globals a (trusted, self-written) pickle refers to."""
    seen: set[str] = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            seen.add(f"{module}.{name}")
            return super().find_class(module, name)

    with warnings.catch_warnings():  # resolving numpy 1.x's numpy.core names warns under numpy 2
        warnings.simplefilter("ignore", DeprecationWarning)
        Recording(io.BytesIO(blob), encoding="latin1").load()
    return seen


# ---------------------------------------------------------------- what each protocol needs, and that it loads


def _expected_globals(protocol: int) -> set[str]:
    """The globals Python 3 + numpy 1.x/2.x write for a CIFAR batch (uint8 array, int or np.int64 labels, str/bytes)."""
    both = lambda module, name: {f"numpy.{core}.{module}.{name}" for core in ("core", "_core")}  # noqa: E731
    if protocol == 5:  # contiguous arrays travel as an in-band buffer
        arrays = {"numpy.dtype"} | both("numeric", "_frombuffer")
    else:
        arrays = {"numpy.ndarray", "numpy.dtype"} | both("multiarray", "_reconstruct")
    codecs_encode = {"_codecs.encode"} if protocol < 3 else set()  # bytes as _codecs.encode(str, 'latin1')
    return arrays | both("multiarray", "scalar") | codecs_encode  # scalar: np.int64 labels


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_globals_each_protocol_writes_are_the_expected_ones(tmp_path: Path, protocol: int) -> None:
    train, test, names = _arrays("cifar10")
    used: set[str] = set()
    for keys in ("str", "bytes"):
        for labels in ("list", "numpy-ints"):
            for numpy1 in (False, True):
                batch_dir = _write_py3(tmp_path / f"{keys}{labels}{numpy1}", "cifar10", train, test, names, protocol,
                                       keys, labels, numpy1=numpy1)
                used |= set().union(*(_recorded_globals(p.read_bytes()) for p in batch_dir.iterdir()))
    assert used == _expected_globals(protocol)
    empty = _recorded_globals(pickle.dumps({b"data": np.zeros((0, 3072), np.uint8)}, protocol=protocol))
    assert ("__builtin__.bytes" in empty) == (protocol < 3)  # an empty split's array holds b'', pickled as bytes()


def test_fastmem_admits_exactly_those_globals() -> None:
    admitted = {f"{module}.{name}" for module, name in _ALLOWED_GLOBALS}
    needed = set().union(*(_expected_globals(p) for p in PROTOCOLS))
    assert admitted == needed | {"__builtin__.bytes", "builtins.bytes"}  # b'' under fix_imports' name and its own


@pytest.mark.parametrize("keys", ["str", "bytes"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("kind", KINDS)
def test_python3_pickles_load_like_the_python2_originals(tmp_path: Path, kind: str, protocol: int, keys: str) -> None:
    train, test, names = _arrays(kind)
    _write_py3(tmp_path / "py3", kind, train, test, names, protocol, keys)
    write_cifar(tmp_path / "py2", kind, train, test, names)
    _assert_loads(tmp_path / "py3", kind, train, test, names)
    _assert_loads(tmp_path / "py2", kind, train, test, names)


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("labels", ["numpy", "numpy-ints"])
def test_numpy_labels_and_numpy1_module_names_load(tmp_path: Path, protocol: int, labels: str) -> None:
    train, test, names = _arrays("cifar100")
    batch_dir = _write_py3(tmp_path, "cifar100", train, test, names, protocol, "bytes", labels, numpy1=True)
    blob = (batch_dir / "train").read_bytes()
    assert b"numpy.core." in blob and b"numpy._core" not in blob
    _assert_loads(tmp_path, "cifar100", train, test, names)


@pytest.mark.parametrize("protocol", [2, 5])
def test_python3_pickles_load_from_the_tar_gz(tmp_path: Path, protocol: int) -> None:
    train, test, names = _arrays("cifar10")
    batch_dir = _write_py3(tmp_path / "src", "cifar10", train, test, names, protocol, "bytes")
    (tmp_path / "data").mkdir()
    with tarfile.open(tmp_path / "data" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(batch_dir, arcname="cifar-10-batches-py")
    _assert_loads(tmp_path / "data", "cifar10", train, test, names)


@pytest.mark.parametrize("protocol", [2, 5])
def test_empty_splits_load(tmp_path: Path, protocol: int) -> None:
    train, _, names = _arrays("cifar10")
    empty = (np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64))
    _write_py3(tmp_path, "cifar10", train, empty, names, protocol, "bytes")
    assert len(load_cifar("cifar10", "test", tmp_path)) == 0


@pytest.mark.parametrize("data", ["bytes", "list"])
@pytest.mark.parametrize("protocol", [2, 5])
def test_data_as_bytes_or_list_unpickles_and_is_named_as_the_wrong_type(tmp_path: Path, protocol: int,
                                                                        data: str) -> None:
    train, test, names = _arrays("cifar10")
    batch_dir = _write_py3(tmp_path, "cifar10", train, test, names, protocol, "bytes", data=data)
    assert isinstance(safe_unpickle((batch_dir / "test_batch").read_bytes(), "x")[b"data"], (bytes, list))
    with pytest.raises(FastmemError, match=r"test_batch: 'data' must be a uint8 N×3072 array"):
        load_cifar("cifar10", "test", tmp_path)


# ---------------------------------------------------------------- torchvision reads the same files the same way


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("kind", KINDS)
def test_torchvision_reads_the_same_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
                                           protocol: int) -> None:
    train, test, names = _arrays(kind)
    _write_py3(tmp_path, kind, train, test, names, protocol, "str", "numpy-ints" if protocol % 2 else "list")
    for split, is_train in (("train", True), ("test", False)):
        ours, theirs = load_cifar(kind, split, tmp_path), _torchvision(tmp_path, kind, is_train, monkeypatch)
        np.testing.assert_array_equal(theirs.data, ours.images)
        np.testing.assert_array_equal(np.asarray(theirs.targets), ours.labels)
        assert tuple(theirs.classes) == ours.class_names == names


@pytest.mark.parametrize("kind", KINDS)
def test_torchvision_reads_the_python2_format_writer_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               kind: str) -> None:
    train, test, names = _arrays(kind)
    write_cifar(tmp_path, kind, train, test, names)
    ours, theirs = load_cifar(kind, "train", tmp_path), _torchvision(tmp_path, kind, True, monkeypatch)
    np.testing.assert_array_equal(theirs.data, ours.images)
    np.testing.assert_array_equal(theirs.targets, ours.labels)
    assert tuple(theirs.classes) == names


# ---------------------------------------------------------------- everything else is still refused


class _Calls:
    """Pickles as a call of `func(*args)`, the way a hostile or careless file would."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


def _refused(tmp_path: Path, blob: bytes, member: str = "test_batch") -> str:
    """Plant `blob` as `member` of a valid CIFAR-10 directory; the one-line error loading it gives."""
    train, test, names = _arrays("cifar10", n_train=5, n_test=2)
    batch_dir = write_cifar(tmp_path / "data", "cifar10", train, test, names)
    (batch_dir / member).write_bytes(blob)
    with pytest.raises(FastmemError) as err:
        load_cifar("cifar10", "test", tmp_path / "data")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{batch_dir / member}: ")
    return message


def _disallowed(what: str) -> str:
    return rf": pickle refers to disallowed global {what} \(only plain numeric numpy arrays are allowed\); not loading it$"


@pytest.mark.parametrize("place", ["data", "labels", "meta"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_code_in_a_pickle_is_refused_without_running_it(tmp_path: Path, protocol: int, place: str) -> None:
    marker = tmp_path / "code-ran"
    evil = _Calls(os.system, f"touch {marker}")
    member, planted = {
        "data": ("test_batch", {"data": evil, "labels": [0, 1]}),
        "labels": ("test_batch", {"data": np.zeros((2, 3072), np.uint8), "labels": [0, evil]}),
        "meta": ("batches.meta", {b"label_names": [evil]}),
    }[place]
    message = _refused(tmp_path, pickle.dumps(planted, protocol=protocol), member)
    assert re.search(_disallowed(rf"{os.system.__module__}\.system"), message), message
    assert not marker.exists()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("where", ["data", "label names"])
def test_numpy_object_arrays_are_refused(tmp_path: Path, protocol: int, where: str) -> None:
    if where == "data":
        blob, member = pickle.dumps({"data": np.zeros((2, 3072), dtype=object), "labels": [0, 1]}, protocol), "test_batch"
    else:
        blob, member = pickle.dumps({"label_names": np.array([f"n{i}" for i in range(10)], object)}, protocol), \
            "batches.meta"
    assert re.search(_disallowed(r"numpy\.dtype\('O8', False, True\)"), _refused(tmp_path, blob, member))


NOT_ADMITTED = {
    # what the pickle calls -> the global the error names
    "codecs.encode to another encoding": (_Calls(codecs.encode, "text", "utf-16"), r"_codecs\.encode\(.*'utf-16'"),
    "codecs.encode with the default encoding": (_Calls(codecs.encode, "text"), r"_codecs\.encode\(\.\.\., \(\)\)"),
    "codecs.encode of bytes": (_Calls(codecs.encode, b"6869", "hex"), r"_codecs\.encode"),
    "codecs.decode": (_Calls(codecs.decode, b"x", "latin1"), r"_codecs\.decode"),
    "bytes(n), an allocation": (_Calls(bytes, 10**12), r"builtins\.bytes with an argument"),
    "numpy unicode arrays": (np.array(["a", "b"]), r"numpy\.dtype\('U1', False, True\)"),
    "numpy structured arrays": (np.zeros(2, [("a", "u1")]), r"numpy\.dtype\('V1', False, True\)"),
    "an object dtype placeholder in _reconstruct": (_Calls(_RECONSTRUCT, np.ndarray, (0,), b"O"),
                                                     r"numpy _reconstruct\(b'O'\)"),
    "a non-empty _reconstruct": (_Calls(_RECONSTRUCT, np.ndarray, (10**9,), b"b"), r"numpy _reconstruct\("),
    "an ndarray subclass": (np.zeros(3).view(np.matrix), r"numpy(\.matrixlib\.defmatrix)?\.matrix"),
    "numpy.frombuffer itself": (_Calls(np.frombuffer, b"ab", "u1"), r"numpy(\._core\.multiarray)?\.frombuffer"),
    "numpy.dtype with other arguments": (_Calls(np.dtype, "u1"), r"numpy\.dtype\('u1',\)"),
}


@pytest.mark.parametrize("case", sorted(NOT_ADMITTED))
def test_other_uses_of_numpy_codecs_and_bytes_are_refused(tmp_path: Path, case: str) -> None:
    payload, named = NOT_ADMITTED[case]
    for protocol in (2, 5):
        message = _refused(tmp_path / str(protocol), pickle.dumps({"data": payload, "labels": [0, 1]}, protocol))
        assert re.search(_disallowed(named + ".*"), message), message


@pytest.mark.parametrize("protocol", [2, 5])
def test_array_buffers_that_do_not_fit_are_corrupt_not_allocated(tmp_path: Path, protocol: int) -> None:
    cases = [_Calls(_FROMBUFFER, b"abc", np.dtype("u1"), (10**12, 3072), "C"),
             _Calls(_FROMBUFFER, b"abc", np.dtype("u1"), (3,), "X"),
             _Calls(np.int64(0).__reduce__()[0], np.dtype("i8"), b"\x00")]
    for index, payload in enumerate(cases):
        message = _refused(tmp_path / f"{protocol}-{index}", pickle.dumps({"data": payload, "labels": [0]}, protocol))
        assert "corrupt or truncated pickle" in message


def test_a_refusal_through_a_cli_is_one_line_and_exit_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) \
        -> None:
    blob = pickle.dumps({"data": np.zeros((2, 3072), dtype=object), "labels": [0, 1]}, protocol=5)
    _refused(tmp_path, blob)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda argv: bool(load_cifar("cifar10", "test", tmp_path / "data")), [])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastmem: error: ") and "disallowed global numpy.dtype('O8'" in lines[0]


def test_a_protocol5_buffer_longer_than_the_file_is_corrupt_before_any_allocation(tmp_path: Path) -> None:
    blob = b"\x80\x05\x96" + struct.pack("<Q", 2**60) + b"."  # BYTEARRAY8 claiming an exabyte
    message = _refused(tmp_path, blob)
    assert message.endswith(f"corrupt or truncated pickle (UnpicklingError: a {2**60}-byte bytearray in a 12-byte pickle)")


def test_a_global_name_with_a_newline_is_named_on_one_line(tmp_path: Path) -> None:
    blob = b"\x80\x04\x8c\x05os\nxy\x8c\x06system\x93."  # STACK_GLOBAL of module 'os\nxy'
    assert re.search(_disallowed(r"'os\\nxy\.system'"), _refused(tmp_path, blob))
