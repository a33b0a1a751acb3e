"""Exact cosine k-NN on CUDA: cuBLAS similarity tiles merged by a streaming top-k kernel (CuPy).

Owns the CUDA backend's search of `fastmem.kernels` (the dispatch in __init__ chooses it); the kernel
launches are in knn_cuda_launch.py, the CPU and torch backends elsewhere. For each chunk of references (the whole set when it is on the GPU; host
tensors, arrays and memmaps stream through two pinned buffers, each copy overlapping the previous
chunk's compute):

1. rows are L2-normalized in fp32 and cast to the GEMM dtype one reference tile at a time;
2. torch.mm (cuBLAS, no TF32, no reduced-precision reductions) fills a queries x references tile
   that `topk_tile` (knn_topk.cu) merges into a running top-K_c list per query, K_c = k + a margin,
   so the Nq x Nr matrix never exists;
3. the candidates get their canonical fp32 similarity (`rerank`) and the best k stay.

Exactness: the canonical similarity is dot(q_hat, r) / ||r|| in fp32, summed in one fixed order by
knn_topk.cu (within fp32 rounding of any other cosine), and |tile similarity - canonical| <=
error_bound(precision, d). When the K_c-th candidate lies more than twice that below the k-th, every
true neighbour is a candidate; a query where it does not (exact ties, duplicates) is redone by brute
force in canonical fp32. So every precision, tiling and chunking returns the same neighbours and
similarities, bit for bit. Ranking: similarity descending, ties to the smaller reference index.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from fastmem.kernels.host_chunks import HOST_CHUNK_BYTES
from fastmem.kernels.knn_cuda_launch import (
    MISSING_MESSAGE,
    CupyKernels,
    KernelOps,
    unavailable_reason,
)

from fastmem.errors import fail

KMAX = 512  # TOPK_KMAX in knn_topk.cu: the longest running list a block keeps in shared memory
SENTINEL = torch.iinfo(torch.int64).max  # index of an empty list slot (similarity -inf)
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
GEMM_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_UNIT_ROUNDOFF = {"fp32": 2.0**-24, "fp16": 2.0**-11, "bf16": 2.0**-8}
_SUBNORMAL_HALF_STEP = {"fp32": 2.0**-150, "fp16": 2.0**-25, "bf16": 2.0**-134}
_MARGIN = {"fp32": 32, "fp16": 128, "bf16": 384}  # extra candidates: the error band is wider in bf16
FALLBACK_ROWS = 1024  # queries per brute-force group (a grid dimension, at most 65535)


def error_bound(precision: str, dim: int) -> float:
    """Bound on |GEMM-tile similarity - canonical fp32 similarity| for L2-normalized rows of width `dim`."""
    u, u32 = _UNIT_ROUNDOFF[precision], 2.0**-24
    gamma = dim * u32 / (1 - dim * u32)  # an fp32 sum of `dim` products: the norms, the canonical dot
    accumulate = dim * 2.0**-22  # the GEMM's fp32 accumulation; 4x gamma as tensor cores truncate
    grow = (1 + gamma + 4 * u32) ** 2  # |q_hat| |r_hat|
    # operand roundings (query, reference and its fp32 scaling), GEMM sum, output rounding,
    # canonical sum and its final product; 1% covers the second-order terms.
    first_order = 2 * u + u32 + accumulate + u + gamma + u32
    return 1.01 * grow * first_order + 3 * math.sqrt(dim) * _SUBNORMAL_HALF_STEP[precision] + 1e-6


def candidate_count(k: int, n: int, precision: str) -> int:
    """Candidates kept per query from `n` references: k plus a margin for the error band, at most KMAX."""
    return min(n, KMAX, k + max(k, _MARGIN[precision]))


def band_misses(approx: torch.Tensor, k: int, bound: float, n: int) -> torch.Tensor:
    """Per query, whether a true neighbour may lie outside its candidates (approx: best first)."""
    kc = approx.shape[1]
    if kc >= n:
        return torch.zeros(approx.shape[0], dtype=torch.bool, device=approx.device)
    return ~(approx[:, kc - 1] < approx[:, k - 1] - 2 * bound)  # NaN counts as a miss


def rank_topk(sims: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (similarity, index) pairs per row: similarity descending, then smaller index."""
    by_index = torch.argsort(idx, dim=1)
    sims, idx = sims.gather(1, by_index), idx.gather(1, by_index)
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
    return sims.gather(1, order), idx.gather(1, order)


def merge_topk(
    a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of two (similarities, indices) lists per row, in any order of arrival."""
    return rank_topk(torch.cat([a[0], b[0]], dim=1), torch.cat([a[1], b[1]], dim=1), k)


def tiles(n: int, tile: int, align: int = 1) -> list[tuple[int, int]]:
    """(start, size) of near-equal tiles of at most `tile` (a multiple of `align`) covering [0, n)."""
    if n <= 0:
        return []
    even = -(-n // -(-n // tile))  # n split into ceil(n / tile) near-equal parts
    size = min(tile, -(-even // align) * align)
    return [(start, min(size, n - start)) for start in range(0, n, size)]


@contextmanager
def _strict_matmul() -> Iterator[None]:
    """cuBLAS without TF32 or reduced-precision reductions for a while: error_bound assumes fp32 sums."""
    flags, saved = torch.backends.cuda.matmul, {}
    for name in ("allow_tf32", "allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction"):
        try:
            value = getattr(flags, name)
            if value:
                setattr(flags, name, False)
                saved[name] = value
        except (AttributeError, RuntimeError, TypeError):  # a torch without the flag or its legacy form
            continue
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(flags, name, value)


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    array = np.asarray(x)
    return torch.from_numpy(array if array.flags.writeable else np.array(array))  # memmaps are read-only


def _storage_dtype(dtype: Any) -> torch.dtype:
    """The dtype rows keep on the device: 16-bit and fp32 as they are, fp64 as fp32."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            return torch.float32 if dtype == torch.float64 else dtype
    elif np.dtype(dtype) in (np.float16, np.float32, np.float64):
        return torch.float16 if np.dtype(dtype) == np.float16 else torch.float32
    fail(f"k-NN needs floating-point embeddings, got {dtype}")


class _HostChunks:
    """Reference rows from host memory in device chunks; on CUDA chunk i+1 copies while chunk i computes."""

    def __init__(self, source: Any, device: torch.device, rows: int) -> None:
        self.source, self.device = source, device
        self.n, dim = source.shape
        self.rows = max(1, min(rows, self.n))
        self.count = -(-self.n // self.rows)
        self.dtype = _storage_dtype(source.dtype)
        self.pinned: list[torch.Tensor] = []
        if device.type == "cuda":
            slots = min(2, self.count)
            self.pinned = [torch.empty((self.rows, dim), dtype=self.dtype, pin_memory=True) for _ in range(slots)]
            self.staged = [torch.empty((self.rows, dim), dtype=self.dtype, device=device) for _ in range(slots)]
            self.stream = torch.cuda.Stream(device)
            for buffer in self.staged:
                buffer.record_stream(self.stream)
            self.copied: list[torch.cuda.Event | None] = [None] * slots
            self.released: list[torch.cuda.Event | None] = [None] * slots
            self.started: set[int] = set()

    def _bounds(self, i: int) -> tuple[int, int]:
        return i * self.rows, min(self.n, (i + 1) * self.rows)

    def _fill(self, host: torch.Tensor, a: int, b: int) -> None:
        if isinstance(self.source, torch.Tensor):
            host.copy_(self.source[a:b])
        else:
            np.copyto(host.numpy(), np.asarray(self.source[a:b]), casting="same_kind")

    def prefetch(self, i: int) -> None:
        """Start chunk i's host-to-device copy (CUDA only; a no-op past the end or when started)."""
        if not self.pinned or i >= self.count or i in self.started:
            return
        slot, (a, b) = i % len(self.pinned), self._bounds(i)
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()  # the pinned buffer's previous copy has left it
        self._fill(self.pinned[slot][: b - a], a, b)
        with torch.cuda.stream(self.stream):
            if self.released[slot] is not None:
                self.stream.wait_event(self.released[slot])  # compute is done with the device buffer
            self.staged[slot][: b - a].copy_(self.pinned[slot][: b - a], non_blocking=True)
            self.copied[slot] = torch.cuda.Event()
            self.copied[slot].record(self.stream)
        self.started.add(i)

    def acquire(self, i: int) -> tuple[int, torch.Tensor]:
        """(first row, rows on the device) of chunk i, ready for work queued on the current stream."""
        a, b = self._bounds(i)
        if not self.pinned:
            host = torch.empty((b - a, self.source.shape[1]), dtype=self.dtype)
            self._fill(host, a, b)
            return a, host.to(self.device)
        self.prefetch(i)
        slot = i % len(self.pinned)
        torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
        return a, self.staged[slot][: b - a]

    def release(self, i: int) -> None:
        """Mark chunk i's device buffer reusable once the work queued so far has run."""
        if self.pinned:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.released[i % len(self.pinned)] = event


class _Buffers:
    """Tile buffers allocated once per search: a reference tile and a similarity tile in the GEMM dtype."""

    def __init__(self, dim: int, ref_rows: int, query_rows: int, dtype: torch.dtype, device: torch.device) -> None:
        self.ref_rows, self.query_rows, self.device = ref_rows, query_rows, device
        self.ref_tile = torch.empty((ref_rows, dim), dtype=dtype, device=device)
        self.sim_tile = torch.empty(query_rows * ref_rows, dtype=dtype, device=device)
        self.exact_tile: torch.Tensor | None = None

    def sims(self, rows: int, ld: int) -> torch.Tensor:
        return self.sim_tile[: rows * ld].view(rows, ld)

    def exact(self, rows: int, ld: int) -> torch.Tensor:
        if self.exact_tile is None:
            self.exact_tile = torch.empty(FALLBACK_ROWS * self.ref_rows, dtype=torch.float32, device=self.device)
        return self.exact_tile[: rows * ld].view(rows, ld)


def _empty_lists(rows: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.full((rows, k), float("-inf"), device=device),
            torch.full((rows, k), SENTINEL, dtype=torch.int64, device=device))


def _scan(ops: KernelOps, qgemm: torch.Tensor, chunk: torch.Tensor, chunk_inv: torch.Tensor, start: int, kc: int,
          bufs: _Buffers) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-kc (tile similarity, index) per query over one chunk, GEMM tile by GEMM tile (queued, no sync)."""
    best_v, best_i = _empty_lists(qgemm.shape[0], kc, qgemm.device)
    for r0, rn in tiles(chunk.shape[0], bufs.ref_rows, 8):
        ld = -(-rn // 8) * 8  # rows 16-byte aligned for the kernel's vector loads; padding rows are zero
        ref_tile = bufs.ref_tile[:ld]
        ops.scale_rows(chunk, r0, rn, chunk_inv, ref_tile)
        for q0, qn in tiles(qgemm.shape[0], bufs.query_rows):
            sims = bufs.sims(qn, ld)
            torch.mm(qgemm[q0 : q0 + qn], ref_tile.T, out=sims)
            ops.topk_tile(sims, rn, start + r0, best_v, best_i, q0)
    return best_v, best_i


def _exact(ops: KernelOps, qhat: torch.Tensor, qids: torch.Tensor, chunk: torch.Tensor, chunk_inv: torch.Tensor,
           start: int, k: int, bufs: _Buffers) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force canonical top-k of queries `qids` over one chunk: the fallback for band misses."""
    parts = []
    for g0, gn in tiles(qids.shape[0], FALLBACK_ROWS):
        best_v, best_i = _empty_lists(gn, k, qhat.device)
        for r0, rn in tiles(chunk.shape[0], bufs.ref_rows, 8):
            tile = bufs.exact(gn, -(-rn // 8) * 8)
            ops.exact_tile(qhat, qids[g0 : g0 + gn], chunk, chunk_inv, r0, rn, tile)
            ops.topk_tile(tile, rn, start + r0, best_v, best_i, 0)
        parts.append((best_v, best_i))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _chunk_topk(ops: KernelOps, qhat: torch.Tensor, qgemm: torch.Tensor, chunk: torch.Tensor, start: int, k: int,
                precision: str, bufs: _Buffers, overlap: Callable[[], None]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Exact top-k over one chunk (similarities, global indices) and the number of brute-forced queries."""
    n = chunk.shape[0]
    k = min(k, n)
    chunk_inv = ops.inv_norms(chunk)
    approx, cand = _scan(ops, qgemm, chunk, chunk_inv, start, candidate_count(k, n, precision), bufs)
    overlap()  # the next host chunk copies while this chunk's kernels run
    best_v, best_i = rank_topk(ops.rerank(qhat, chunk, chunk_inv, start, cand), cand, k)
    misses = band_misses(approx, k, error_bound(precision, chunk.shape[1]), n).nonzero().flatten()  # syncs
    if misses.numel():
        exact_v, exact_i = _exact(ops, qhat, misses, chunk, chunk_inv, start, k, bufs)
        best_v[misses], best_i[misses] = exact_v, exact_i
    return best_v, best_i, int(misses.numel())


def _check(reference: Any, queries: Any, k: int, precision: str, ref_tile: int, query_tile: int) -> None:
    if len(reference.shape) != 2 or len(queries.shape) != 2 or reference.shape[1] != queries.shape[1]:
        fail(f"k-NN needs 2-D inputs of equal width, got {tuple(reference.shape)} and {tuple(queries.shape)}")
    if not 1 <= k <= reference.shape[0]:
        fail(f"k must be in [1, {reference.shape[0]}], got {k}")
    if k > KMAX:
        fail(f"the CUDA k-NN keeps at most k={KMAX} neighbours, got k={k}; use backend='torch'")
    if precision not in GEMM_DTYPES:
        fail(f"unknown k-NN precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if ref_tile < 8 or query_tile < 1:
        fail(f"tiles need ref_tile >= 8 and query_tile >= 1, got {ref_tile} and {query_tile}")


def search(reference: Any, queries: Any, k: int, ops: KernelOps, *, device: torch.device, precision: str,
           ref_tile: int, query_tile: int, host_chunk: int | None = None,
           stats: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiled exact search behind knn_topk_cuda, on `device` with kernels `ops` (CPU-testable)."""
    _check(reference, queries, k, precision, ref_tile, query_tile)
    dim, gemm_dtype = reference.shape[1], GEMM_DTYPES[precision]
    resident = isinstance(reference, torch.Tensor) and reference.device == device
    itemsize = torch.empty(0, dtype=_storage_dtype(reference.dtype)).element_size()
    chunk_rows = reference.shape[0] if resident else host_chunk or max(8, HOST_CHUNK_BYTES // (dim * itemsize))
    with _strict_matmul(), torch.no_grad():
        qraw = _as_tensor(queries).to(device, torch.float32).contiguous()
        qhat = torch.empty_like(qraw)
        ops.scale_rows(qraw, 0, qraw.shape[0], ops.inv_norms(qraw), qhat)
        del qraw
        qgemm = qhat if gemm_dtype == torch.float32 else qhat.to(gemm_dtype)
        ref_rows = min(ref_tile // 8 * 8, -(-min(chunk_rows, reference.shape[0]) // 8) * 8)
        bufs = _Buffers(dim, ref_rows, max(1, min(query_tile, qhat.shape[0])), gemm_dtype, device)
        best = _empty_lists(qhat.shape[0], 0, device)
        fallbacks = 0
        if resident:
            chunk = reference.detach().to(_storage_dtype(reference.dtype)).contiguous()
            v, i, fallbacks = _chunk_topk(ops, qhat, qgemm, chunk, 0, k, precision, bufs, lambda: None)
            best, chunks = (v, i), 1
        else:
            loader = _HostChunks(reference, device, chunk_rows)
            for index in range(loader.count):
                start, chunk = loader.acquire(index)
                v, i, missed = _chunk_topk(ops, qhat, qgemm, chunk, start, k, precision, bufs,
                                           functools.partial(loader.prefetch, index + 1))
                loader.release(index)
                best, fallbacks = merge_topk(best, (v, i), k), fallbacks + missed
            chunks = loader.count
    if stats is not None:
        stats.update(precision=precision, chunks=chunks, fallback_queries=fallbacks,
                     candidates=candidate_count(k, min(chunk_rows, reference.shape[0]), precision))
    return best


def _target_device(reference: Any, queries: Any) -> torch.device:
    for x in (queries, reference):
        if isinstance(x, torch.Tensor) and x.device.type == "cuda":
            return x.device
    return torch.device("cuda", torch.cuda.current_device())


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' means fp16 on GPUs with tensor cores (exact thanks to the re-rank), else fp32."""
    if device.type != "cuda":
        return "fp32" if precision == "auto" else precision
    major, _ = torch.cuda.get_device_capability(device)
    if precision == "auto":
        return "fp16" if major >= 7 else "fp32"
    if precision == "bf16" and major < 8:
        fail(f"bf16 k-NN needs compute capability 8.0 or newer, {torch.cuda.get_device_name(device)} has {major}.x")
    return precision


def knn_topk_cuda(
    reference: torch.Tensor | np.ndarray,
    queries: torch.Tensor | np.ndarray,
    k: int,
    *,
    precision: str = "auto",
    ref_tile: int = 65536,
    query_tile: int = 4096,
    host_chunk: int | None = None,
    stats: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k cosine neighbours on CUDA: similarities (float32) and indices (int64), (Nq, k), best first.

    `reference` may be a CUDA tensor (used in place), a CPU tensor, an array or a memmap (streamed in
    chunks of `host_chunk` rows); `precision` picks the GEMM dtype, all giving the same exact result.
    """
    reason = unavailable_reason()
    if reason:
        fail(f"{MISSING_MESSAGE} ({reason})")
    if precision not in PRECISIONS:
        fail(f"unknown k-NN precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    device = _target_device(reference, queries)
    with torch.cuda.device(device):
        ops = CupyKernels(device)
        with ops.active():
            return search(reference, queries, k, ops, device=device, precision=resolve_precision(precision, device),
                          ref_tile=ref_tile, query_tile=query_tile, host_chunk=host_chunk, stats=stats)
