"""Exact cosine k-NN on the CPU: a low-precision GEMM screens candidates, fp32 re-ranks them.

Owns `knn_topk_cpu` (top-k similarities and indices); the vote and the device dispatch live elsewhere.
Tie rule (the same as kernels/knn_torch.py): ranked by fp32 cosine similarity, best first; equal
similarities go to the smaller reference index. Rows are L2-normalized in fp32; a zero row stays
zero and has similarity 0 with everything, never NaN.

Route (kernels in kernels/knn_cpu_screen.py). One worker thread per core takes blocks of queries
(sorted by largest |component|, so one int8 scale fits a block) and runs one-thread GEMMs on
rounded copies of the unit rows, chunk by chunk of references, so that each tile of scores z
(lowered by the reference's error term b_r) stays in that core's L2; one pass over the tile keeps
a per-row top-k heap of z (root tau) and appends every reference with z + 2 b_r >= tau - 2 a_q.
A vector loop flags the references that can pass, and only the flagged ones (a few per tile once
tau has settled) are scored exactly; a row's first tile fills its heap before appending, so tau
starts at that tile's k-th best. Exact, not likely: with s' the fp32 similarity, |z + b_r - s'| <= a_q + b_r
(below); k references have s' >= tau - a_q, so the fp32 k-th best is >= tau - a_q, and a reference
that can reach it has z + a_q + 2 b_r >= tau - a_q (tau only grows: earlier tiles kept a superset).
At the end the pairs with z >= tau (at least k) are re-ranked in fp32; the k-th best of the values
re-ranked so far, tau_e, is <= the exact k-th best, so only references with z + 2 b_r >= tau_e - a_q
are re-ranked as well, tau_e rising as they come in (~60 per query on Gaussian rows, not ~280), and
the top-k taken with the tie rule. A query whose
candidates pass `candidate_limit` (duplicates, tight clusters, collapsed embeddings) is redone on
the plain fp32 path (`KnnCpuStats.fallback_queries`), whose GEMM scores are the final values.

Error bound. q, r: fp32 unit rows (r = fl(x fl(1/||x||))); q^, r^: the rounded copies the GEMM
sees; e_q = ||q^ - q||, e_r = ||r^ - r||, measured per row; N >= ||r||, ||r^||; s' = fl(fl(q.x)/||x||).
Cauchy-Schwarz on q^.r^ - q.r = (q^ - q).r^ + q.(r^ - r), with |q.r - s'| <= gamma_{d+2} ||q|| N
and gamma_n = n 2^-24 / (1 - n 2^-24), gives |z + b_r - s'| <= a_q + b_r for
    b_r = max||q|| (e_r + 2^-24 N),   a_q = e_q N + gamma_{d+2} ||q|| N + arith_q.
  int8 (VNNI, torch._int_mm): q^ = s Q (one scale per block), r^ = s_r R (one per row),
    scales max|x|/127; Q.R is an exact int32 sum (checked once per process), scaled and biased in float64
    and rounded to fp32: arith_q = 2^-20 (||q^|| N + max b).
  bf16: the rounding (unit roundoff u = 2^-8) is inside e_q, e_r; bf16 products are exact in fp32,
    the d-term sum costs gamma_d ||q^|| N (+ 4 d 2^-126, flushed denormals), and torch rounds the
    product to bf16: arith_q = (gamma_d + u (1 + gamma_d) + 2^-20) ||q^|| N + 2^-20 max b + 4 d 2^-126.
Screen values stay below 2 in magnitude, so thresholds drop a further 2^-20 for fp32 rounding.
Gaussian 512-d rows have e ~ 0.0074 (int8), 0.0017 (bf16): a ~0.03 window around the k-th.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import torch

from fastmem.errors import fail

from . import knn_cpu_screen as screen
from .knn_cpu_screen import PAD, ROUNDING

PRECISIONS = ("auto", "fp32", "bf16", "int8")
PIECE = 2048  # rows per bf16 encoding piece: temporaries stay in cache


@dataclass
class KnnCpuStats:
    """What `knn_topk_cpu` calls did (counts add up): the screen, pairs it kept, fp32 fallbacks."""

    precision: str = ""
    queries: int = 0
    candidates: int = 0
    fallback_queries: int = 0


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def _int_mm_exact() -> bool:
    """torch._int_mm gives exact int32 sums on extreme int8 codes (no vpmaddubsw saturation)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (48, 528), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (528, 80), dtype=torch.int8, generator=gen)
    a[:8], b[:, :8] = 127, -127
    try:
        return torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long())
    except RuntimeError:
        return False


def _int8_available() -> bool:
    """VNNI/AMX int8 (exact int32 sums) and torch's int8 GEMM."""
    has_op = hasattr(torch, "_int_mm") and torch.backends.mkldnn.is_available()
    return has_op and bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}) and _int_mm_exact()


def resolve_precision(precision: str) -> str:
    """The screen a call will use: auto picks int8 with VNNI, bf16 with fast bf16, else fp32."""
    if precision not in PRECISIONS:
        fail(f"unknown k-NN precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "int8" and not _int8_available():
        fail("k-NN precision int8 needs a CPU with VNNI (avx512_vnni/avx_vnni) and torch built with oneDNN")
    if precision != "auto":
        return precision
    # int8 first: on a Xeon with avx512_bf16 but no AMX, oneDNN's bf16 GEMM ran at 0.6x fp32, int8 at ~5x.
    if _int8_available():
        return "int8"
    return "bf16" if cpu_flags() & {"amx_bf16", "avx512_bf16"} else "fp32"


def _gamma(n: int) -> float:
    """Higham's gamma_n for fp32: bound on the relative error of an n-term dot product."""
    return n * 2.0**-24 / (1 - n * 2.0**-24)


def _norm_bound(d: int) -> float:
    """Bound on the norm of an fp32-normalized row of width d (rounding of norm, 1/norm, product)."""
    return 1 + (d + 8) * 2.0**-23


def _inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """1 / ||row|| in fp32, with 0 for zero rows so they normalize to zero instead of NaN."""
    norms = torch.linalg.vector_norm(x, dim=1)
    return torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))


def _encode(x: torch.Tensor, inv: torch.Tensor, precision: str, scale: torch.Tensor | None = None,
            pad: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rounded copy of the unit rows fl(x inv) (int8 codes, width padded to a multiple of 16 —
    torch._int_mm misreads width 1 —, with per-row or given scales; or bf16), the scales, and a
    bound on ||r^ - r|| per row (float64). `pad` zero rows are added at the end."""
    n, d = x.shape
    err = torch.zeros(n + pad, dtype=torch.float64)
    if precision == "int8":
        codes = torch.zeros(n + pad, -(-d // PAD) * PAD, dtype=torch.int8)
        scales = torch.ones(n + pad)
        given = scale if scale is not None else torch.zeros(n)
        screen.encode_int8(x.numpy(), inv.numpy(), given.numpy(), codes[:n].numpy(), scales[:n].numpy(), err[:n].numpy())
    else:
        codes, scales = torch.zeros(n + pad, d, dtype=torch.bfloat16), torch.ones(n + pad)
        for s in range(0, n, PIECE):
            e = min(s + PIECE, n)
            unit = x[s:e] * inv[s:e, None]
            codes[s:e] = unit.to(torch.bfloat16)
            err[s:e] = torch.linalg.vector_norm(unit - codes[s:e].float(), dim=1).double()
    # Margins for the fp32/float64 arithmetic of the measurement itself.
    return codes, scales, err * (1 + (d + 4) * 2.0**-23) + 2.0**-22


@dataclass
class _Refs:
    """References in chunks (columns starts[j] to starts[j + 1], the last zero-padded), encoded for one screen."""

    precision: str
    starts: list[int]
    count: int
    x: torch.Tensor  # (count, d) fp32 rows, for the re-rank
    chunks: list[torch.Tensor]  # per chunk: int8 codes (d16, width), bf16 rows or fp32 rows (width, d)
    col_scale: torch.Tensor  # (padded,) fp32: int8 scales s_r, 1 (bf16), 1/||x|| (fp32)
    slack: torch.Tensor  # (padded,) fp32 b_r, rounded up (0 on the fp32 path)
    inv_norm: torch.Tensor  # (padded,) fp32 1/||x||, 0 for zero and padding rows
    norm: float  # N
    slack_max: float


def _encode_refs(x: torch.Tensor, precision: str, width: int) -> _Refs:
    """Normalize and encode the reference rows (one int8 scale per row); fp32 chunks are views of
    `x` (the last one padded). (A first chunk 8x as wide, for a better first tau, measured no faster.)"""
    count, d = x.shape
    padded = -(-count // width) * width
    starts = list(range(0, padded + 1, width))
    inv = torch.cat([_inverse_norms(x), torch.zeros(padded - count)])
    if precision == "fp32":
        padded_x = torch.cat([x[starts[-2] :], x.new_zeros(padded - count, d)])
        chunks = [x[s:e] for s, e in zip(starts[:-2], starts[1:-1], strict=True)] + [padded_x]
        return _Refs(precision, starts, count, x, chunks, inv, torch.zeros(padded), inv, 1.0, 0.0)
    codes, scales, err = _encode(x, inv[:count], precision, pad=padded - count)
    n_bound = max(float(err.max()) + _norm_bound(d), 1.0) * _norm_bound(d)
    slack = (_norm_bound(d) * (err + 2.0**-24 * n_bound) * (1 + ROUNDING)).float()
    # int8: (d16, width) views, which torch._int_mm takes as they are (a copy measured slower).
    chunks = [codes[s:e].T if precision == "int8" else codes[s:e] for s, e in zip(starts, starts[1:], strict=False)]
    return _Refs(precision, starts, count, x, chunks, scales, slack, inv, n_bound, float(slack.max()))


@dataclass
class _Queries:
    """Unit query rows, their encoded copies (one int8 scale per block), and the error term a_q."""

    unit: torch.Tensor
    encoded: torch.Tensor
    scale: torch.Tensor  # per row, equal within a block
    bound: torch.Tensor  # a_q (fp64)


def _encode_queries(unit: torch.Tensor, refs: _Refs, block: int) -> _Queries:
    """Encode unit query rows, sorted by peak |component|, for the references' screen, all at once."""
    rows, d, n = unit.shape[0], unit.shape[1], refs.norm
    if refs.precision == "fp32":  # the screen scores are the final values: nothing to bound
        return _Queries(unit, unit, torch.ones(rows), torch.zeros(rows, dtype=torch.float64))
    q_norm = torch.linalg.vector_norm(unit, dim=1).double() * _norm_bound(d)
    common = None
    if refs.precision == "int8":  # each block takes the scale of its last (largest) peak
        last = torch.clamp(torch.arange(rows) // block * block + block - 1, max=rows - 1)
        common = torch.maximum(unit.amax(1), -unit.amin(1))[last] / 127
    encoded, scale, err = _encode(unit, torch.ones(rows), refs.precision, common)
    norm = _norm_bound(d) + err
    rerank = _gamma(d + 2) * q_norm * n
    if refs.precision == "int8":
        arith = 2.0**-20 * (norm * n + refs.slack_max)
    else:
        u = 2.0**-8
        arith = (_gamma(d) + u * (1 + _gamma(d)) + 2.0**-20) * norm * n + 2.0**-20 * refs.slack_max + 4 * d * 2.0**-126
    return _Queries(unit, encoded, scale, (err * n + rerank + arith) * (1 + ROUNDING))


class _Buffers(threading.local):
    """One worker thread's tile and candidate buffers, reused across its blocks."""

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        have = getattr(self, name, None)
        if have is None or have.shape != shape or have.dtype != dtype:
            have = torch.empty(shape, dtype=dtype)
            setattr(self, name, have)
        return have


def _block(q: _Queries, rows: slice, refs: _Refs, k: int, limit: int, bufs: _Buffers,
           sims: torch.Tensor, idx: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Exact top-k of one block of queries into sims/idx: the candidate count, and the block's rows
    that passed `limit` (left for the fp32 path)."""
    n, exact = rows.stop - rows.start, refs.precision == "fp32"
    heap = bufs.get("heap", (n, k), torch.float32)
    capacity = max(2 * limit, 2 * k + 8)
    cols, values = bufs.get("cols", (n, capacity), torch.int32), bufs.get("values", (n, capacity), torch.float32)
    heap_n, counts = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
    qscale, bound = np.float32(q.scale[rows.start]), q.bound[rows].numpy()
    col_scale, slack = refs.col_scale.numpy(), refs.slack.numpy()
    encoded = q.encoded[rows]
    for chunk, ref in enumerate(refs.chunks):
        start, stop = refs.starts[chunk], refs.starts[chunk + 1]
        acc = bufs.get(f"acc{refs.precision}{stop - start}", (n, stop - start),
                       torch.int32 if refs.precision == "int8" else torch.float32)
        if refs.precision == "int8":
            torch._int_mm(encoded, ref, out=acc)
        elif refs.precision == "bf16":
            acc.copy_(torch.mm(encoded, ref.T))
        else:
            torch.mm(encoded, ref.T, out=acc)
        valid, last = min(stop, refs.count) - start, chunk == len(refs.chunks) - 1
        screen.scan_tile(acc.numpy(), valid, start, qscale, col_scale[start:stop], slack[start:stop], slack, bound,
                         exact, heap.numpy(), heap_n.numpy(), cols.numpy(), values.numpy(), counts.numpy(), limit, last)
    screen.finish_rows(q.unit[rows].numpy(), refs.x.numpy(), refs.inv_norm.numpy(), slack, bound, exact, heap.numpy(),
                cols.numpy(), values.numpy(), counts.numpy(), sims[rows].numpy(), idx[rows].numpy())
    over = counts == screen.OVERFLOW
    return int(counts[~over].sum()), torch.nonzero(over).flatten()


def _topk_rows(unit: torch.Tensor, refs: _Refs, plain: Callable[[], _Refs], k: int, block: int, limit: int,
               threads: int, stats: KnnCpuStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of unit query rows (sorted by peak), blocks spread over `threads` workers;
    rows past `limit` are redone on the plain fp32 path."""
    block = max(PAD, min(block, -(-unit.shape[0] // threads)))  # every worker gets a block
    q = _encode_queries(unit, refs, block)
    sims, idx = torch.empty(unit.shape[0], k), torch.empty(unit.shape[0], k, dtype=torch.int64)
    bufs, lock = _Buffers(), threading.Lock()

    def work(start: int) -> None:
        rows = slice(start, min(start + block, unit.shape[0]))
        found, over = _block(q, rows, refs, k, limit, bufs, sims, idx)
        if len(over):
            fp32, again = plain(), unit[rows][over]
            part_sims, part_idx = torch.empty(len(over), k), torch.empty(len(over), k, dtype=torch.int64)
            _block(_encode_queries(again, fp32, block), slice(0, len(over)), fp32, k, limit, bufs, part_sims, part_idx)
            sims[rows][over], idx[rows][over] = part_sims, part_idx
        with lock:
            stats.fallback_queries += len(over)
            stats.candidates += found if refs.precision != "fp32" else 0

    starts = range(0, unit.shape[0], block)
    if threads == 1 or len(starts) == 1:
        for start in starts:
            work(start)
    else:
        with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            list(pool.map(work, starts))  # one-thread GEMMs: each core keeps its tile in its own L2
    return sims, idx


def knn_topk_cpu(
    reference: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    *,
    precision: str = "auto",
    query_block: int = 512,
    reference_chunk: int = 1024,
    candidate_limit: int | None = None,
    stats: KnnCpuStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k cosine similarities (float32) and reference indices (int64), (Nq, k), best first.

    `precision` picks the screen (auto, int8, bf16) or the plain fp32 path; the result is the same.
    `candidate_limit` (pairs per query, default max(2048, Nr/16) up to 16384) bounds memory and
    sends a query to the fp32 path when the screen cannot separate its neighbours. Runs on
    torch.get_num_threads() worker threads. On a shared machine run with OMP_WAIT_POLICY=PASSIVE:
    libgomp's spinning barriers stall (up to 10x here) whenever another process holds a core.
    """
    if reference.ndim != 2 or queries.ndim != 2 or reference.shape[1] != queries.shape[1]:
        fail(f"k-NN needs 2-D inputs of equal width, got {tuple(reference.shape)} and {tuple(queries.shape)}")
    if reference.device.type != "cpu" or queries.device.type != "cpu":
        fail("knn_topk_cpu needs CPU tensors; use the CUDA k-NN for GPU tensors")
    if not 1 <= k <= reference.shape[0]:
        fail(f"k must be in [1, {reference.shape[0]}], got {k}")
    resolved = resolve_precision(precision)
    if resolved == "int8" and reference.shape[1] > 100_000:
        resolved = "fp32"  # int32 sums of up to 127 * 127 * d would overflow
    stats = stats if stats is not None else KnnCpuStats()
    stats.precision = resolved
    stats.queries += queries.shape[0]
    width = -(-min(max(reference_chunk, 1), reference.shape[0]) // PAD) * PAD
    limit = candidate_limit or min(max(2048, reference.shape[0] // 16), 16384)
    threads = max(1, torch.get_num_threads())
    previous, previous_numba = torch.get_float32_matmul_precision(), numba.get_num_threads()
    torch.set_float32_matmul_precision("highest")  # fp32 GEMMs must stay fp32 (no bf16/tf32 shortcut)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # the caller's count
    try:
        x = reference.float().contiguous()
        plain = functools.cache(lambda: _encode_refs(x, "fp32", width))  # built on first fallback only
        refs = plain() if resolved == "fp32" else _encode_refs(x, resolved, width)
        plain_refs = _once(plain)
        qry = queries.float() * _inverse_norms(queries.float())[:, None]
        sims = torch.zeros(qry.shape[0], k)
        # A zero query ties with every reference at 0: the first k indices, by the tie rule.
        idx = torch.arange(k).repeat(qry.shape[0], 1)
        peak = torch.maximum(qry.amax(1), -qry.amin(1))
        # Blocks of queries with similar peaks share one int8 scale at little cost in precision.
        live = torch.argsort(peak)[int((peak == 0).sum()):]
        if len(live):
            torch.set_num_threads(1)  # the workers' GEMMs run on one thread each
            try:
                sims[live], idx[live] = _topk_rows(qry[live].contiguous(), refs, plain_refs, k, query_block, limit,
                                                   threads, stats)
            finally:
                torch.set_num_threads(threads)
    finally:
        torch.set_float32_matmul_precision(previous)
        numba.set_num_threads(previous_numba)
    return sims, idx


def _once(build: Callable[[], _Refs]) -> Callable[[], _Refs]:
    """`build` called at most once, from whichever worker thread first needs it."""
    lock = threading.Lock()

    def get() -> _Refs:
        with lock:
            return build()

    return get
