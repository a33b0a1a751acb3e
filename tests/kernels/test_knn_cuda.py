"""The CUDA k-NN: its kernels compile, its search logic is exact (on CPU with torch stand-ins for the
kernels), it fails clearly without a GPU, and on a GPU it agrees with scikit-learn and the torch path."""

from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import site
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastmem.kernels import knn_cuda_launch, knn_torch
from fastmem.kernels.knn_cuda import (
    KMAX,
    band_misses,
    error_bound,
    knn_topk_cuda,
    merge_topk,
    search,
    tiles,
)
from fastmem.kernels.knn_cuda_launch import KERNEL_SOURCE, cuda_available
from sklearn.neighbors import NearestNeighbors

from fastmem.errors import FastmemError

gpu = pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a usable CUDA GPU")


class TorchKernels:
    """CPU stand-in for knn_topk.cu with the same contracts; canonical dots are fp64 rounded to fp32."""

    def inv_norms(self, x: torch.Tensor) -> torch.Tensor:
        return (1.0 / x.double().norm(dim=1).clamp_min(1e-12)).float()

    def scale_rows(self, x, row0, n_valid, inv, out) -> None:
        out.zero_()
        out[:n_valid] = (x[row0 : row0 + n_valid].float() * inv[row0 : row0 + n_valid, None]).to(out.dtype)

    def topk_tile(self, sims, n_cols, col_offset, best_v, best_i, row0) -> None:
        rows, width = sims.shape[0], best_v.shape[1]
        idx = torch.arange(col_offset, col_offset + n_cols).expand(rows, n_cols)
        state = (best_v[row0 : row0 + rows], best_i[row0 : row0 + rows])
        v, i = merge_topk(state, (sims[:, :n_cols].float(), idx), width)
        best_v[row0 : row0 + rows], best_i[row0 : row0 + rows] = v, i

    def rerank(self, qhat, ref, ref_inv, ref_start, cand):
        local = (cand - ref_start).clamp(0, ref.shape[0] - 1)
        dots = torch.einsum("qd,qkd->qk", qhat.double(), ref[local].double()).float()
        inside = (cand >= ref_start) & (cand < ref_start + ref.shape[0])
        return torch.where(inside, dots * ref_inv[local], torch.tensor(float("-inf")))

    def exact_tile(self, qhat, qids, ref, ref_inv, row0, n_cols, out) -> None:
        dots = (qhat[qids].double() @ ref[row0 : row0 + n_cols].double().T).float()
        out[:, :n_cols] = dots * ref_inv[row0 : row0 + n_cols]


def _emulated(reference, queries, k, precision="fp32", ref_tile=256, query_tile=64, host_chunk=None, stats=None):
    return search(reference, queries, k, TorchKernels(), device=torch.device("cpu"), precision=precision,
                  ref_tile=ref_tile, query_tile=query_tile, host_chunk=host_chunk, stats=stats)


def _data(n=3000, nq=500, d=24, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, d))
    reference = centres[rng.integers(0, 5, n)] + 1.5 * rng.normal(size=(n, d))
    queries = centres[rng.integers(0, 5, nq)] + 1.5 * rng.normal(size=(nq, d))
    return reference.astype(np.float32), queries.astype(np.float32)


def _sklearn(reference, queries, k):
    dist, idx = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(reference).kneighbors(queries)
    return 1 - dist, idx


def _assert_same_neighbours(got, oracle, k: int, atol: float = 1e-6) -> None:
    """Same top-k as an oracle computed with other rounding: exact indices wherever the oracle's
    similarities (k+1 columns where there are more references) are further than atol from a neighbour's."""
    sims, idx = (t.cpu().numpy() if isinstance(t, torch.Tensor) else t for t in got)
    o_sims, o_idx = (t.cpu().numpy() if isinstance(t, torch.Tensor) else t for t in oracle)
    np.testing.assert_allclose(sims, o_sims[:, :k], atol=atol, rtol=0)
    near = np.abs(np.diff(o_sims, axis=1)) <= 2 * atol
    firm = np.ones(o_sims.shape, bool)
    firm[:, :-1] &= ~near
    firm[:, 1:] &= ~near
    firm = firm[:, :k]
    assert np.array_equal(idx[firm], o_idx[:, :k][firm]) and firm.mean() > 0.9


def _tied_data(n=600, nq=40, d=16, seed=0):
    """0/1 rows with exactly four ones: unit rows hold 0.5s, so every similarity is an exact multiple of
    1/4 in any precision and order; many duplicates and ties. Returns the data and the exact ranking."""
    rng = np.random.default_rng(seed)

    def rows(m):
        out = np.zeros((m, d), np.float32)
        for r in range(m):
            out[r, rng.choice(d // 2, 4, replace=False)] = 1  # half the dims: plenty of duplicates
        return out

    reference, queries = rows(n), rows(nq)
    sims = (queries @ reference.T) / 4
    order = np.stack([np.lexsort((np.arange(n), -s)) for s in sims])
    return reference, queries, sims, order


def _nvrtc() -> ctypes.CDLL | None:
    """libnvrtc from pip's nvidia packages or CUDA_HOME, its builtins preloaded; None when absent."""
    roots = [os.path.join(p, "nvidia", "*", "lib") for p in site.getsitepackages()]
    roots.append(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "lib64"))
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "libnvrtc.so*"))):
            if ".alt." in path:
                continue
            for builtins in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*")):
                if ".alt." not in builtins:
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(path)
    return None


# --- the CUDA source compiles (no GPU needed) ----------------------------------------------------------


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernel_source_compiles_with_nvcc(arch: str, tmp_path: Path) -> None:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    out = tmp_path / f"knn_{arch}.ptx"
    result = subprocess.run(["nvcc", "--ptx", f"-arch={arch}", "-o", str(out), str(KERNEL_SOURCE)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ptx = out.read_text()
    for kernel in ("topk_tile_f16", "topk_tile_bf16", "topk_tile_f32", "rerank_f16", "exact_tile_bf16",
                   "inv_norms_f32", "scale_rows_f32_f16", "scale_rows_bf16_bf16"):
        assert f".entry {kernel}(" in ptx


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_kernel_source_compiles_with_nvrtc_as_cupy_does(arch: str) -> None:
    lib = _nvrtc()
    if lib is None:
        pytest.skip("libnvrtc is not installed")
    program = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(program), KERNEL_SOURCE.read_bytes(), b"knn_topk.cu", 0, None, None) == 0
    options = (ctypes.c_char_p * 1)(f"--gpu-architecture={arch}".encode())
    status = lib.nvrtcCompileProgram(program, 1, options)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, log)
    lib.nvrtcDestroyProgram(ctypes.byref(program))
    assert status == 0, log.value.decode()


# --- without a GPU ----------------------------------------------------------------------------------------


def test_without_cupy_or_gpu_the_cuda_knn_fails_clearly() -> None:
    if cuda_available():
        pytest.skip("a usable GPU is present")
    assert cuda_available() is False  # cached, never raises
    with pytest.raises(FastmemError, match=r"CUDA k-NN needs CuPy and a GPU: pip install -e \.\[cuda12\] or \.\[cuda13\]"):
        knn_topk_cuda(torch.randn(10, 4), torch.randn(2, 4), 3)


# --- the search logic, on CPU with torch stand-ins for the kernels ----------------------------------------


def test_tiles_cover_the_range_in_aligned_near_equal_parts() -> None:
    for n, tile, align in [(10000, 4096, 1), (5_000_003, 65536, 8), (7, 8, 8), (64, 64, 8), (65, 64, 8)]:
        parts = tiles(n, tile, align)
        assert [s for s, _ in parts] == list(np.cumsum([0] + [m for _, m in parts])[:-1])
        assert sum(m for _, m in parts) == n and all(0 < m <= tile for _, m in parts)
        assert all(s % align == 0 for s, _ in parts)
    assert tiles(0, 8) == []


def test_merge_keeps_similarity_then_smaller_index_in_any_arrival_order() -> None:
    a = (torch.tensor([[0.75, 0.5, 0.5]]), torch.tensor([[7, 3, 9]]))
    b = (torch.tensor([[0.5, 0.5, 0.1]]), torch.tensor([[1, 8, 2]]))
    for first, second in [(a, b), (b, a)]:
        v, i = merge_topk(first, second, 4)
        assert i.tolist() == [[7, 1, 3, 8]] and v.tolist() == [[0.75, 0.5, 0.5, 0.5]]


def test_band_misses_flags_queries_whose_candidates_may_be_short() -> None:
    approx = torch.tensor([[0.9, 0.8, 0.5, 0.4], [0.9, 0.8, 0.79, 0.78], [0.9, 0.8, 0.8, 0.8]])
    assert band_misses(approx, 2, 0.05, 100).tolist() == [False, True, True]
    assert band_misses(approx, 2, 0.05, 4).tolist() == [False, False, False]  # every reference is a candidate


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_error_bound_holds_for_reduced_precision_gemm(precision: str) -> None:
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    gen = torch.Generator().manual_seed(0)
    for d in (24, 512):
        ref = torch.nn.functional.normalize(torch.randn(4000, d, generator=gen), dim=1)
        qry = torch.nn.functional.normalize(torch.randn(64, d, generator=gen), dim=1)
        exact = qry.double() @ ref.double().T
        approx = (qry.to(dtype) @ ref.to(dtype).T).double()
        worst = (approx - exact).abs().max().item()
        assert worst <= error_bound(precision, d) <= 20 * worst + 1e-3  # sound, and not absurdly loose


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_emulated_search_matches_sklearn(precision: str) -> None:
    reference, queries = _data()
    sims, idx = _emulated(reference, queries, 20, precision)
    expected_sims, expected_idx = _sklearn(reference, queries, 20)
    assert np.array_equal(idx.numpy(), expected_idx)
    np.testing.assert_allclose(sims.numpy(), expected_sims, atol=1e-5)


def test_every_precision_returns_the_same_bits() -> None:
    reference, queries = _data(seed=3)
    fp32 = _emulated(reference, queries, 30, "fp32")
    for precision in ("fp16", "bf16"):
        other = _emulated(reference, queries, 30, precision, ref_tile=1000, query_tile=128)
        assert torch.equal(fp32[0], other[0]) and torch.equal(fp32[1], other[1])


@pytest.mark.parametrize("n, nq, k", [(37, 1, 37), (37, 5, 1), (1, 3, 1), (1001, 9, 13), (8, 2, 8)])
def test_emulated_odd_sizes_match_the_torch_path(n: int, nq: int, k: int) -> None:
    reference, queries = _data(n=n, nq=nq, seed=n)
    sims, idx = _emulated(reference, queries, k, "fp16", ref_tile=64, query_tile=4)
    expected_sims, expected_idx = knn_torch.knn_topk(torch.from_numpy(reference), torch.from_numpy(queries), k)
    assert sims.shape == (nq, k) and idx.dtype == torch.int64
    assert torch.equal(idx, expected_idx)
    torch.testing.assert_close(sims, expected_sims, atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_emulated_ties_go_to_the_smaller_index_through_the_exact_fallback(precision: str) -> None:
    reference, queries, sims, order = _tied_data()
    stats: dict = {}
    got_sims, got_idx = _emulated(reference, queries, 25, precision, ref_tile=128, query_tile=16, stats=stats)
    assert np.array_equal(got_idx.numpy(), order[:, :25])
    assert np.array_equal(got_sims.numpy(), np.take_along_axis(sims, order[:, :25], 1))
    assert stats["fallback_queries"] > 0  # ties fill the error band: the brute-force path ran


def test_emulated_host_chunks_give_the_resident_result(tmp_path: Path) -> None:
    reference, queries = _data(n=2000, seed=5)
    resident = _emulated(torch.from_numpy(reference), queries, 20, "fp16")
    memmap = np.lib.format.open_memmap(tmp_path / "ref.npy", mode="w+", dtype=np.float32, shape=reference.shape)
    memmap[:] = reference
    memmap.flush()
    readonly = np.load(tmp_path / "ref.npy", mmap_mode="r")
    for source, chunk in [(readonly, 333), (reference.astype(np.float64), 700)]:
        stats: dict = {}
        streamed = _emulated(source, queries, 20, "fp16", host_chunk=chunk, stats=stats)
        assert stats["chunks"] == -(-2000 // chunk)
        assert torch.equal(streamed[0], resident[0]) and torch.equal(streamed[1], resident[1])
    small = _emulated(reference[:150], queries, 20, "fp16")
    tiny_chunks = _emulated(reference[:150], queries, 20, "fp16", host_chunk=7)  # chunks smaller than k
    assert torch.equal(small[0], tiny_chunks[0]) and torch.equal(small[1], tiny_chunks[1])


def test_emulated_half_precision_storage_is_searched_as_stored() -> None:
    reference, queries = _data(seed=7)
    half = torch.from_numpy(reference).half()
    sims, idx = _emulated(half, queries, 10, "fp16")
    expected = _sklearn(half.float().numpy(), queries, 10)[1]
    assert np.array_equal(idx.numpy(), expected)


@pytest.mark.parametrize("k, precision, message", [(0, "fp32", "k must be"), (KMAX + 1, "fp32", "at most k"),
                                                   (5, "fp8", "unknown k-NN precision")])
def test_bad_arguments_are_user_errors(k: int, precision: str, message: str) -> None:
    reference, queries = _data(n=600, nq=3)
    with pytest.raises(FastmemError, match=message):
        _emulated(reference, queries, k, precision)
    with pytest.raises(FastmemError, match="equal width"):
        _emulated(reference, queries[:, :5], 3)


# --- the CuPy launches, checked against the kernels' C signatures (CPU, with a stand-in CuPy) ---------------

_ELEMENT = {"f32": torch.float32, "f16": torch.int16, "bf16": torch.int16}  # 16-bit data travels as raw bits
_FLOATS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _kernel_signatures() -> dict[str, list[str]]:
    """Kernel name -> parameter kinds ('elem*', 'in*', 'out*', 'float*', 'int64*', 'int64', 'int32')."""
    source = KERNEL_SOURCE.read_text().replace("\\\n", " ")
    signatures = {}
    for name, params in re.findall(r"(\w+)_##SUFFIX\(([^)]*)\)", source) + re.findall(
            r"(scale_rows)_##SI##_##SO\(([^)]*)\)", source):
        kinds = []
        for param in params.split(","):
            param = param.strip()
            kinds.append("in*" if "EI::T*" in param else "out*" if "EO::T*" in param else "elem*" if "E::T*" in param
                         else "float*" if "float*" in param else "int64*" if "long long*" in param
                         else "int64" if param.startswith("long long") else "int32")
        signatures[name] = kinds
    return signatures


class _FakeKernel:
    """Checks a launch against the C signature, then runs the kernel's contract from the raw arguments."""

    def __init__(self, name: str, signatures: dict[str, list[str]]) -> None:
        self.name = name
        self.base = next(b for b in signatures if name.startswith(b + "_"))
        self.kinds = signatures[self.base]
        self.types = name[len(self.base) + 1 :].split("_")  # element type suffixes

    def __call__(self, grid, block, args) -> None:
        assert len(args) == len(self.kinds), self.name
        for arg, kind in zip(args, self.kinds):
            if kind.endswith("*"):
                expected = {"float*": torch.float32, "int64*": torch.int64, "elem*": _ELEMENT[self.types[0]],
                            "in*": _ELEMENT[self.types[0]], "out*": _ELEMENT[self.types[-1]]}[kind]
                assert isinstance(arg, torch.Tensor) and arg.dtype == expected and arg.is_contiguous(), self.name
            else:
                assert type(arg) is {"int64": np.int64, "int32": np.int32}[kind], (self.name, kind, arg)
        kernels, a = TorchKernels(), [int(x) if not isinstance(x, torch.Tensor) else x for x in args]
        value = {t: _FLOATS[t] for t in self.types}
        if self.base == "inv_norms":
            x, n, d, out = a
            out[:n] = kernels.inv_norms(x.view(value[self.types[0]]).view(n, d))
        elif self.base == "scale_rows":
            x, row0, n_valid, inv, out, d = a
            kernels.scale_rows(x.view(value[self.types[0]]).view(-1, d), row0, n_valid, inv,
                               out.view(value[self.types[-1]]).view(-1, d)[: grid[0]])
        elif self.base == "topk_tile":
            sims, ld, n_cols, col_offset, best_v, best_i, k, row0 = a
            tile = sims.view(value[self.types[0]]).flatten()[: grid[0] * ld].view(grid[0], ld)
            kernels.topk_tile(tile, n_cols, col_offset, best_v.view(-1, k), best_i.view(-1, k), row0)
        elif self.base == "rerank":
            qhat, d, ref, ref_inv, ref_start, ref_rows, cand, kc, out = a
            ref = ref.view(value[self.types[0]]).view(ref_rows, d)
            out.view(-1, kc)[: grid[0]] = kernels.rerank(qhat.view(-1, d), ref, ref_inv, ref_start, cand.view(-1, kc))
        else:
            qhat, qids, qid0, d, ref, ref_inv, row0, n_cols, out, ld = a
            ref = ref.view(value[self.types[0]]).view(-1, d)
            kernels.exact_tile(qhat.view(-1, d), qids[qid0 : qid0 + grid[1]], ref, ref_inv, row0, n_cols,
                               out.flatten()[: grid[1] * ld].view(grid[1], ld))


def test_cupy_launches_match_the_kernel_signatures(monkeypatch: pytest.MonkeyPatch) -> None:
    signatures = _kernel_signatures()
    assert set(signatures) == {"inv_norms", "topk_tile", "rerank", "exact_tile", "scale_rows"}
    fake = types.SimpleNamespace(
        from_dlpack=lambda t: t,
        RawModule=lambda **_: types.SimpleNamespace(get_function=lambda name: _FakeKernel(name, signatures)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(knn_cuda_launch, "_module", lambda: fake.RawModule())
    reference, queries, sims, order = _tied_data(n=700, nq=30)
    for precision in ("fp32", "fp16", "bf16"):
        for source in (torch.from_numpy(reference).bfloat16(), reference.astype(np.float16)):
            got = search(source, queries, 25, knn_cuda_launch.CupyKernels(torch.device("cpu")), device=torch.device("cpu"),
                         precision=precision, ref_tile=256, query_tile=16, host_chunk=300)
            assert np.array_equal(got[1].numpy(), order[:, :25])


# --- on a GPU ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "auto"])
def test_cuda_matches_sklearn_and_the_torch_path(precision: str) -> None:
    if precision == "bf16" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 needs compute capability 8.0")
    reference, queries = _data()
    sims, idx = knn_topk_cuda(torch.from_numpy(reference).cuda(), torch.from_numpy(queries).cuda(), 20,
                              precision=precision, ref_tile=1024, query_tile=128)
    assert sims.is_cuda and sims.dtype == torch.float32 and idx.dtype == torch.int64
    _assert_same_neighbours((sims, idx), _sklearn(reference, queries, 21), 20, atol=1e-5)
    oracle = knn_torch.knn_topk(torch.from_numpy(reference).cuda(), torch.from_numpy(queries).cuda(), 21)
    _assert_same_neighbours((sims, idx), oracle, 20)


@pytest.mark.gpu
@gpu
def test_cuda_precisions_agree_bit_for_bit_at_scale() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    reference = torch.randn(150_000, 128, device="cuda", generator=gen).half()
    queries = torch.randn(3000, 128, device="cuda", generator=gen)
    stats: dict = {}
    fp32 = knn_topk_cuda(reference, queries, 50, precision="fp32")
    fp16 = knn_topk_cuda(reference, queries, 50, precision="fp16", stats=stats)
    assert torch.equal(fp32[0], fp16[0]) and torch.equal(fp32[1], fp16[1])
    assert stats["fallback_queries"] < 30  # random data: the error band rarely holds 128 extra candidates
    exact = F.normalize(queries[:500].double(), dim=1) @ F.normalize(reference.double(), dim=1).T
    assert (exact.topk(50, dim=1).indices.sort(1).values == fp16[1][:500].sort(1).values).float().mean() > 0.999


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n, nq, k", [(37, 1, 37), (37, 5, 1), (1, 3, 1), (5001, 9, 13), (3000, 40, 300)])
def test_cuda_odd_sizes_match_the_emulation(n: int, nq: int, k: int) -> None:
    reference, queries = _data(n=n, nq=nq, seed=n)
    sims, idx = knn_topk_cuda(torch.from_numpy(reference).cuda(), queries, k, ref_tile=64, query_tile=7)
    assert sims.shape == (nq, k)
    _assert_same_neighbours((sims, idx), _emulated(reference, queries, min(k + 1, n), "fp32"), k)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("precision, ref_tile", [("fp32", 512), ("fp16", 512), ("fp16", 4096)])
def test_cuda_ties_go_to_the_smaller_index(precision: str, ref_tile: int) -> None:
    # ~43 copies of each of 70 rows; k=60 puts the k-th neighbour in a block of hundreds of exact ties.
    # ref_tile=4096 makes a round's 2048 values overflow the kernel's candidate buffer mid-round.
    reference, queries, sims, order = _tied_data(n=3000, nq=200)
    stats: dict = {}
    got_sims, got_idx = knn_topk_cuda(torch.from_numpy(reference).cuda(), queries, 60, precision=precision,
                                      ref_tile=ref_tile, query_tile=64, stats=stats)
    assert np.array_equal(got_idx.cpu().numpy(), order[:, :60])
    assert np.array_equal(got_sims.cpu().numpy(), np.take_along_axis(sims, order[:, :60], 1))
    assert stats["fallback_queries"] > 0


@pytest.mark.gpu
@gpu
def test_cuda_host_streamed_references_give_the_resident_result(tmp_path: Path) -> None:
    reference, queries = _data(n=20000, nq=300, d=64, seed=11)
    path = tmp_path / "ref.npy"
    np.save(path, reference.astype(np.float16))
    memmap = np.load(path, mmap_mode="r")
    resident = knn_topk_cuda(torch.from_numpy(np.array(memmap)).cuda(), queries, 20)
    for source, chunk in [(memmap, 3001), (torch.from_numpy(np.array(memmap)), 7000), (memmap, 20000)]:
        streamed = knn_topk_cuda(source, torch.from_numpy(queries).cuda(), 20, host_chunk=chunk, ref_tile=2048)
        assert torch.equal(streamed[0], resident[0]) and torch.equal(streamed[1], resident[1])


@pytest.mark.gpu
@gpu
def test_cuda_bfloat16_storage_and_half_queries_match_the_emulation() -> None:
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 needs compute capability 8.0")
    reference, queries = _data(n=4000, nq=64, seed=13)
    ref16, qry16 = torch.from_numpy(reference).bfloat16(), torch.from_numpy(queries).half()
    sims, idx = knn_topk_cuda(ref16.cuda(), qry16.cuda(), 20, precision="bf16")
    _assert_same_neighbours((sims, idx), _emulated(ref16, qry16, 21, "fp32"), 20)
