"""Exact cosine k-NN on the CPU: a low-precision GEMM screens candidates, fp32 re-ranks them.

Owns `knn_topk_cpu` (top-k similarities and indices); the vote and the device dispatch live elsewhere.
Tie rule (the same as kernels/knn_torch.py): ranked by fp32 cosine similarity, best first; equal
similarities go to the smaller reference index. Rows are L2-normalized in fp32; a zero row stays
zero and has similarity 0 with everything, never NaN.

Route. Per block of queries (sorted by largest |component|, so one int8 scale fits a block) and
chunk of references, a GEMM on rounded copies of the unit rows gives a score z per pair, lowered by
the reference's error term b_r (oneDNN's bias). Maxima over strided groups of 16, then 8 of those,
give tau <= the k-th best z without a full top-k. Every reference with z + 2 b_r >= tau - 2 a_q
(a numba scan opens only the groups that can hold one) is re-scored in fp32 and the top-k taken
with the tie rule (a second numba kernel, per row). Exact, not likely: with
s' the fp32 similarity, |z + b_r - s'| <= a_q + b_r (below); k references have s' >= tau - a_q,
so the fp32 k-th best is >= tau - a_q, and a reference that can reach it has z + a_q + 2 b_r >=
tau - a_q. A block whose candidates pass `candidate_limit` per query (duplicates, tight clusters,
collapsed embeddings) is redone on the plain fp32 path (`KnnCpuStats.fallback_queries`).

Error bound. q, r: fp32 unit rows (r = fl(x fl(1/||x||))); q^, r^: the rounded copies the GEMM
sees; e_q = ||q^ - q||, e_r = ||r^ - r||, measured per row; N >= ||r||, ||r^||; s' = fl(fl(q.x)/||x||).
Cauchy-Schwarz on q^.r^ - q.r = (q^ - q).r^ + q.(r^ - r), with |q.r - s'| <= gamma_{d+2} ||q|| N
and gamma_n = n 2^-24 / (1 - n 2^-24), gives |z + b_r - s'| <= a_q + b_r for
    b_r = max||q|| (e_r + 2^-24 N),   a_q = e_q N + gamma_{d+2} ||q|| N + arith_q.
  int8 (VNNI): q^ = s Q (one scale per block), r^ = s_r R (per row), scales max|x|/127; Q.R is an
    exact int32 sum, scaled and biased in fp32: arith_q = 2^-20 (||q^|| N + max b).
  bf16: the rounding (unit roundoff u = 2^-8) is inside e_q, e_r; bf16 products are exact in fp32,
    the d-term sum costs gamma_d ||q^|| N (+ 4 d 2^-126, flushed denormals), and torch rounds the
    product to bf16: arith_q = (gamma_d + u (1 + gamma_d) + 2^-20) ||q^|| N + 2^-20 max b + 4 d 2^-126.
Screen values stay below 2 in magnitude, so thresholds drop a further 2^-20 for fp32 rounding.
Gaussian 512-d rows have e ~ 0.0074 (int8), 0.0017 (bf16): a ~0.03 window around the k-th.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch

from fastmem.errors import fail

PRECISIONS = ("auto", "fp32", "bf16", "int8")
GROUPS = (16, 8)  # strided group sizes of the two levels: groups of 16, then 128 references
PIECE = 2048  # rows per encoding piece: temporaries stay in cache and off mmap
PASS_BYTES = 64 << 20  # screen scores held per query block before they are opened
ROUNDING = 2.0**-20  # covers fp32 rounding of screen-scale values (|v| < 2) in thresholds


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


def _int8_available() -> bool:
    """VNNI/AMX int8 (exact int32 sums, no vpmaddubsw saturation) and oneDNN's int8 matmul op."""
    has_op = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
    return has_op and bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


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


def _encode_rows(r: torch.Tensor, precision: str, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Rounded copy of unit rows (int8 codes with per-row or given scales, or bf16), with bounds on
    ||r^ - r|| and ||r^|| (the latter by the triangle inequality, saving a pass)."""
    if precision == "int8":
        if scale is None:
            scale = torch.maximum(r.amax(1), -r.amin(1)) / 127  # max |r| without an |r| temporary
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.mul(r, 1 / scale.reshape(-1, 1)).round_().clamp_(-127, 127)
        diff = torch.addcmul(r, codes, scale.reshape(-1, 1), value=-1)
        encoded = codes.to(torch.int8)
    else:
        encoded = r.to(torch.bfloat16)
        diff, scale = r - encoded.float(), torch.ones(r.shape[0])
    # r - fl(s Q) is exact (Sterbenz), fl(s Q) is within 2^-24 of s Q, fp32 norms add (d + 2) 2^-24.
    err = torch.linalg.vector_norm(diff, dim=1).double() * (1 + (r.shape[1] + 4) * 2.0**-23) + 2.0**-22
    return encoded, scale, err, _norm_bound(r.shape[1]) + err


@dataclass
class _Refs:
    """References in chunks of `width` columns (the last zero-padded), encoded for one screen."""

    precision: str
    width: int
    count: int
    chunks: list[Any]  # per chunk: fp32 rows, bf16 rows or (packed int8, scales, zero points)
    inv_norm: torch.Tensor  # (padded,) fp32 1/||x||, 0 for zero and padding rows
    slack: torch.Tensor  # (padded,) fp32 b_r, rounded up
    norm: float  # N
    slack_max: float


def _inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """1 / ||row|| in fp32, with 0 for zero rows so they normalize to zero instead of NaN."""
    norms = torch.linalg.vector_norm(x, dim=1)
    return torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))


def _encode_refs(x: torch.Tensor, precision: str, width: int) -> _Refs:
    """Normalize and encode the reference rows piece by piece; fp32 chunks are views of `x`."""
    count, d = x.shape
    padded = -(-count // width) * width
    inv = torch.zeros(padded)
    err = torch.zeros(padded, dtype=torch.float64)
    norm = torch.zeros(padded, dtype=torch.float64)
    codes = torch.zeros(padded if precision != "fp32" else 0, d, dtype=torch.int8 if precision == "int8" else torch.bfloat16)
    scales = torch.ones(padded)
    for s in range(0, count, PIECE):
        e = min(s + PIECE, count)
        inv[s:e] = _inverse_norms(x[s:e])
        if precision != "fp32":
            codes[s:e], scales[s:e], err[s:e], norm[s:e] = _encode_rows(x[s:e] * inv[s:e, None], precision)
    n_bound = max(float(norm.max()), 1.0) * _norm_bound(d)
    slack = (_norm_bound(d) * (err + 2.0**-24 * n_bound) * (1 + ROUNDING)).float() if precision != "fp32" else inv * 0
    chunks: list[Any] = []
    for s in range(0, padded, width):
        if precision == "int8":
            packed = torch.ops.onednn.qlinear_prepack(codes[s : s + width], None)
            chunks.append((packed, scales[s : s + width], torch.zeros(width, dtype=torch.int64)))
        elif precision == "bf16":
            chunks.append(codes[s : s + width])
        else:
            part = x[s : s + width]
            chunks.append(part if part.shape[0] == width else torch.cat([part, part.new_zeros(width - part.shape[0], d)]))
    return _Refs(precision, width, count, chunks, inv, slack, n_bound, float(slack.max()))


@dataclass
class _Queries:
    """Unit query rows, their encoded copies (one int8 scale per block), and the error term a_q."""

    unit: torch.Tensor
    encoded: Any
    scale: torch.Tensor  # per row, equal within a block
    bound: torch.Tensor  # a_q (fp64)


def _encode_queries(unit: torch.Tensor, refs: _Refs, block: int) -> _Queries:
    """Encode unit query rows, sorted by peak |component|, for the references' screen, all at once."""
    d, n = unit.shape[1], refs.norm
    if refs.precision == "fp32":  # the screen scores are the final values: nothing to bound
        return _Queries(unit, unit, torch.ones(unit.shape[0]), torch.zeros(unit.shape[0], dtype=torch.float64))
    q_norm = torch.linalg.vector_norm(unit, dim=1).double() * _norm_bound(d)
    common = None
    if refs.precision == "int8":  # each block takes the scale of its last (largest) peak
        last = torch.clamp(torch.arange(unit.shape[0]) // block * block + block - 1, max=unit.shape[0] - 1)
        peak = torch.maximum(unit.amax(1), -unit.amin(1))
        common = peak[last] / 127
    encoded, scale, err, norm = _encode_rows(unit, refs.precision, common)
    rerank = _gamma(d + 2) * q_norm * n
    if refs.precision == "int8":
        encoded = (encoded.to(torch.int16) + 128).to(torch.uint8)  # u8 with zero point 128
        arith = 2.0**-20 * (norm * n + refs.slack_max)
    else:
        u = 2.0**-8
        arith = (_gamma(d) + u * (1 + _gamma(d)) + 2.0**-20) * norm * n + 2.0**-20 * refs.slack_max + 4 * d * 2.0**-126
    return _Queries(unit, encoded, scale, (err * n + rerank + arith) * (1 + ROUNDING))


def _scores(q: _Queries, rows: slice, refs: _Refs, chunk: int) -> torch.Tensor:
    """Screen scores z (fp32) of a block of queries against one chunk, padding columns at -inf."""
    encoded = refs.chunks[chunk]
    cols = slice(chunk * refs.width, (chunk + 1) * refs.width)
    if refs.precision == "int8":
        packed, scale, zero_points = encoded
        z = torch.ops.onednn.qlinear_pointwise(q.encoded[rows], float(q.scale[rows.start]), 128, packed, scale,
                                               zero_points, -refs.slack[cols], 1.0, 0, torch.float32, "none", [], "")
    elif refs.precision == "bf16":
        z = torch.mm(q.encoded[rows], encoded.T).float().sub_(refs.slack[cols])
    else:  # plain fp32: the same fl(fl(q.x) / ||x||) form as the re-rank
        z = torch.mm(q.encoded[rows], encoded.T).mul_(refs.inv_norm[cols])
    valid = refs.count - chunk * refs.width
    if valid < refs.width:
        z[:, valid:] = -math.inf
    return z


def _levels(width: int, k: int) -> tuple[int, int]:
    """Group sizes of the two levels, each 1 where too few groups would remain for a tight tau."""
    first = GROUPS[0] if width // GROUPS[0] >= 2 * k else 1
    second = GROUPS[1] if width // (first * GROUPS[1]) >= 2 * k else 1
    return first, second


def _thresholds(tau: torch.Tensor, bound: torch.Tensor, exact: bool) -> torch.Tensor:
    """tau - 2 a_q, lowered for fp32 rounding and rounded down to fp32 (exact: tau itself)."""
    if exact:
        return tau.clamp_min(-torch.finfo(torch.float32).max)
    t = tau.double() - 2 * bound - ROUNDING
    t32 = t.float()
    t32 = torch.where(t32.double() > t, torch.nextafter(t32, torch.tensor(-math.inf)), t32)
    return t32.clamp_min(-torch.finfo(torch.float32).max)  # -inf padding never passes


@numba.njit(parallel=True, cache=True, nogil=True)
def _scan(z, level1, group_slack, col_slack, thr, first_col, cols, values, counts):  # pragma: no cover - numba
    """Append (column, z) of every score with z + 2 b >= its row threshold to the row's buffer.

    Only groups whose maximum plus their largest 2 b passes are opened; group g holds the columns
    g + t * groups. A row may count past the buffer's width: the caller sees the overflow.
    """
    nrows, groups = level1.shape
    size, width = z.shape[1] // groups, cols.shape[1]
    for i in numba.prange(nrows):
        t, n = thr[i], counts[i]
        for g in range(groups):
            if level1[i, g] + group_slack[g] >= t:
                for m in range(size):
                    col = g + m * groups
                    if z[i, col] + col_slack[col] >= t:
                        if n < width:
                            cols[i, n], values[i, n] = first_col + col, z[i, col]
                        n += 1
        counts[i] = n


@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _finish(q, x, inv_norm, col_slack, thr, cols, values, counts, rerank, sims, idx):  # pragma: no cover - numba
    """Top-k per row by (value descending, index ascending) of the pairs that pass the row's final
    threshold; with `rerank`, values are first replaced by fp32 similarities fl(fl(q.x) / ||x||).

    One dot-product loop for every pair (any summation order meets gamma_d), so duplicate
    references tie exactly. (A second filter on the int8 rows, 512 B per pair instead of 2 KB,
    was slower: the dot products, not the memory, dominate.)
    """
    bits = values.view(np.int32)
    for i in numba.prange(cols.shape[0]):
        keys, where = np.empty(counts[i], dtype=np.int64), np.empty(counts[i], dtype=np.int64)
        m = 0
        for j in range(counts[i]):
            col = cols[i, j]
            if values[i, j] + col_slack[col] < thr[i]:
                continue
            if rerank:
                acc = numba.float32(0.0)
                for u in range(q.shape[1]):
                    acc += q[i, u] * x[col, u]
                values[i, j] = acc * inv_norm[col] + numba.float32(0.0)  # +0.0 turns -0.0 into +0.0
            b = np.int64(bits[i, j])
            ordered = b if b >= 0 else b ^ 0x7FFFFFFF  # monotone in the float value
            keys[m], where[m] = ordered * 2**32 + (2**32 - 1 - col), j  # unique per row
            m += 1
        best = np.argsort(keys[:m])[::-1][: sims.shape[1]]
        for j in range(sims.shape[1]):
            sims[i, j], idx[i, j] = values[i, where[best[j]]], cols[i, where[best[j]]]


def _screen(q: _Queries, rows: slice, refs: _Refs, k: int, limit: int) -> tuple[torch.Tensor, ...] | None:
    """Per row, the (reference, z) pairs that can reach the top-k, plus each row's final threshold.

    Scores of up to PASS_BYTES of chunks are held so that they are opened with the final tau of
    the pass; later passes (huge reference sets) start from the tau reached so far. None past
    `limit` pairs per row on average; below it, a row that outgrows the buffers widens them and
    the pass is scanned again (the plain fp32 path has no limit: massive exact ties do that).
    """
    nrows, exact = rows.stop - rows.start, refs.precision == "fp32"
    first, second = _levels(refs.width, k)
    per_pass = max(1, PASS_BYTES // (4 * nrows * refs.width))
    top = torch.full((nrows, k), -math.inf)
    width = 4 * k + 256
    cols, values = torch.empty(nrows, width, dtype=torch.int64), torch.empty(nrows, width)
    counts = torch.zeros(nrows, dtype=torch.int64)
    for start in range(0, len(refs.chunks), per_pass):
        held, maxima = [], [top]
        for chunk in range(start, min(start + per_pass, len(refs.chunks))):
            z = _scores(q, rows, refs, chunk)
            level1 = z.view(nrows, first, -1).amax(1) if first > 1 else z
            maxima.append(level1.view(nrows, second, -1).amax(1) if second > 1 else level1)
            held.append((chunk, z, level1))
        # One top-k per pass: torch.topk costs ~2 us per row whatever the row length.
        top = torch.topk(torch.cat(maxima, dim=1), k, dim=1).values
        thr = _thresholds(top[:, -1], q.bound[rows], exact)
        before = counts.clone()
        while True:
            for chunk, z, level1 in held:
                slack = 2 * refs.slack[chunk * refs.width : (chunk + 1) * refs.width]
                group_slack = slack.view(first, -1).amax(0) if first > 1 else slack
                _scan(z.numpy(), level1.numpy(), group_slack.numpy(), slack.numpy(), thr.numpy(),
                      chunk * refs.width, cols.numpy(), values.numpy(), counts.numpy())
            if not exact and int(counts.sum()) > limit * nrows:
                return None
            if int(counts.max()) <= width:
                break
            width = int(counts.max())
            cols = torch.cat([cols, cols.new_empty(nrows, width - cols.shape[1])], dim=1)
            values = torch.cat([values, values.new_empty(nrows, width - values.shape[1])], dim=1)
            counts.copy_(before)
    return cols, values, counts, thr


def _topk_rows(x: torch.Tensor, unit: torch.Tensor, refs: _Refs, plain: Callable[[], _Refs], k: int, block: int,
               limit: int, stats: KnnCpuStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of unit query rows (sorted by peak), block by block; blocks past `limit` are
    redone on the plain fp32 path, whose GEMM scores are the final values."""
    q, exact = _encode_queries(unit, refs, block), refs.precision == "fp32"
    sims, idx = torch.empty(unit.shape[0], k), torch.empty(unit.shape[0], k, dtype=torch.int64)
    for s in range(0, unit.shape[0], block):
        rows = slice(s, min(s + block, unit.shape[0]))
        found = _screen(q, rows, refs, k, limit)
        if found is None:
            stats.fallback_queries += rows.stop - rows.start
            sims[rows], idx[rows] = _topk_rows(x, unit[rows], plain(), plain, k, block, limit, stats)
            continue
        cols, values, counts, thr = found  # an early pass may have let through pairs below thr
        stats.candidates += 0 if exact else int(counts.sum())
        _finish(unit[rows].numpy(), x.numpy(), refs.inv_norm.numpy(), 2 * refs.slack.numpy(), thr.numpy(),
                cols.numpy(), values.numpy(), counts.numpy(), not exact, sims[rows].numpy(), idx[rows].numpy())
    return sims, idx


def knn_topk_cpu(
    reference: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    *,
    precision: str = "auto",
    query_block: int = 128,
    reference_chunk: int = 25000,
    candidate_limit: int | None = None,
    stats: KnnCpuStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k cosine similarities (float32) and reference indices (int64), (Nq, k), best first.

    `precision` picks the screen (auto, int8, bf16) or the plain fp32 path; the result is the same.
    `candidate_limit` (pairs per query, default max(1024, Nr/8) up to 32768) bounds memory and
    sends a block to the fp32 path when the screen cannot separate its neighbours. On a shared
    machine run with OMP_WAIT_POLICY=PASSIVE: libgomp's spinning barriers stall (up to 10x here)
    whenever another process holds a core.
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
    # Even chunks, each a multiple of both group sizes so that the levels tile it exactly.
    chunks = -(-reference.shape[0] // max(reference_chunk, 1))
    tile = GROUPS[0] * GROUPS[1]
    width = -(-reference.shape[0] // (chunks * tile)) * tile
    limit = candidate_limit or min(max(1024, reference.shape[0] // 8), 32768)
    previous, previous_numba = torch.get_float32_matmul_precision(), numba.get_num_threads()
    torch.set_float32_matmul_precision("highest")  # fp32 GEMMs must stay fp32 (no bf16/tf32 shortcut)
    try:
        x = reference.float().contiguous()
        plain = functools.cache(lambda: _encode_refs(x, "fp32", width))  # built on first fallback only
        refs = plain() if resolved == "fp32" else _encode_refs(x, resolved, width)
        qry = queries.float() * _inverse_norms(queries.float())[:, None]
        sims = torch.zeros(qry.shape[0], k)
        # A zero query ties with every reference at 0: the first k indices, by the tie rule.
        idx = torch.arange(k).repeat(qry.shape[0], 1)
        peak = torch.maximum(qry.amax(1), -qry.amin(1))
        # Blocks of queries with similar peaks share one int8 scale at little cost in precision.
        live = torch.argsort(peak)[int((peak == 0).sum()):]
        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))  # the caller's count
        sims[live], idx[live] = _topk_rows(x, qry[live], refs, plain, k, query_block, limit, stats)
    finally:
        torch.set_float32_matmul_precision(previous)
        numba.set_num_threads(previous_numba)
    return sims, idx
