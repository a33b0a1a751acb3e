"""Exact cosine k-NN on the CPU: a low-precision GEMM screens candidates, fp32 re-ranks them.

Owns `knn_topk_cpu` (top-k similarities and indices); the vote and the device dispatch live elsewhere.

Tie rule (the same as kernels/knn_torch.py): neighbours are ranked by fp32 cosine similarity, best
first, and equal similarities go to the smaller reference index. Rows are L2-normalized in fp32; a
zero row stays zero and has similarity 0 with everything, never NaN.

Route. Per block of queries (sorted by their largest |component| so one int8 scale fits them all)
and chunk of references, a GEMM on rounded copies of the unit rows gives a screen score z for each
pair, already lowered by the pair's reference error term b_r (oneDNN's bias). Maxima over strided
groups of 8, then 8 of those, give tau, a lower bound on the k-th best z, without a full top-k.
Every reference with z + 2 b_r >= tau - 2 a_q is re-scored in fp32 (a sampled matmul) and the
exact top-k taken with the tie rule. Why that is exact: with s' the fp32 similarity and
|z + b_r - s'| <= a_q + b_r (below), k references have s' >= z - a_q >= tau - a_q, so the fp32
k-th best is >= tau - a_q, and a reference that can reach it has z + a_q + 2 b_r >= tau - a_q. A
block whose candidates pass `candidate_limit` per query (duplicates, tight clusters, collapsed
embeddings) is redone on the plain fp32 path instead (`KnnCpuStats.fallback_queries`).

Error bound. q, r: fp32 unit rows (r = fl(x * fl(1/||x||))); q^, r^: the rounded copies the GEMM
sees; e_q = ||q^ - q||, e_r = ||r^ - r|| measured per row, so the bound is as tight as the data
allows; N >= ||r||, ||r^||, ||x||/||x||_fp32; s' = fl(fl(q.x) / ||x||), the re-ranked similarity.
Cauchy-Schwarz on q^.r^ - q.r = (q^ - q).r^ + q.(r^ - r), plus |q.r - s'| <= gamma_{d+2} ||q|| N
with gamma_n = n 2^-24 / (1 - n 2^-24), gives |z + b_r - s'| <= a_q + b_r with
    b_r = max||q|| (e_r + 2^-24 N),
    a_q = e_q N + gamma_{d+2} ||q|| N + arith_q.
  int8 (VNNI): q^ = s Q with one scale per block, r^ = s_r R per row, scales max|x|/127; Q.R is an
    exact int32 sum, scaled and biased in fp32: arith_q = 2^-20 (||q^|| N + max b).
  bf16: the rounding (unit roundoff u = 2^-8) is inside e_q, e_r; bf16 products are exact in fp32,
    the d-term sum costs gamma_d ||q^|| N (+ 4 d 2^-126 for flushed denormals) and torch returns a
    bf16 product: arith_q = (gamma_d + u (1 + gamma_d) + 2^-20) ||q^|| N + 2^-20 max b + 4 d 2^-126.
All screen arithmetic is on values below 2 in magnitude, so thresholds drop 2^-20 for fp32 rounding.
For Gaussian 512-d rows e ~ 0.0074 (int8) or 0.0017 (bf16): a window of ~0.03 around the k-th.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastmem.errors import fail

PRECISIONS = ("auto", "fp32", "bf16", "int8")
GROUPS = (16, 8)  # strided group sizes of the two levels: groups of 16, then 128 references
PIECE = 2048  # rows per encoding piece: temporaries stay in cache and off mmap
PASS_BYTES = 64 << 20  # screen scores held per query block before they are opened
SUPER_BLOCKS = 16  # query blocks whose candidates are re-ranked together
ROUNDING = 2.0**-20  # covers fp32 rounding of screen-scale values (|v| < 2) in thresholds
INT64_MIN = -(2**63)
SCAN_MODE = 0


@dataclass
class KnnCpuStats:
    """What one `knn_topk_cpu` call did: the screen used, pairs re-ranked in fp32, fp32 fallbacks."""

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
        return tau
    t = tau.double() - 2 * bound - ROUNDING
    t32 = t.float()
    t32 = torch.where(t32.double() > t, torch.nextafter(t32, torch.tensor(-math.inf)), t32)
    return t32.clamp_min(-torch.finfo(torch.float32).max)  # -inf padding never passes


def _extract(z: torch.Tensor, level1: torch.Tensor, first: int, thr: torch.Tensor,
             slack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, column, z) of the scores with z + 2 b >= the row threshold, rows ascending.

    The scan runs over group maxima plus the group's largest 2 b; only passing groups are opened
    (group g holds columns g + t * groups, t < first). Opening groups of 64 first was slower: at
    ~0.4% candidates a third of them pass.
    """
    if first == 1:
        rows, cols = (z + 2 * slack >= thr[:, None]).nonzero(as_tuple=True)
        return rows, cols, z[rows, cols]
    groups = level1.shape[1]
    by_group = 2 * slack.view(first, groups).T.contiguous()  # (groups, first): a group's members in one row
    if SCAN_MODE == 0:
        rows, cols = (level1 + by_group.amax(1) >= thr[:, None]).nonzero(as_tuple=True)
    else:
        rows, cols = (level1 >= (thr - float(by_group.max()))[:, None]).nonzero(as_tuple=True)
    picked = z.view(z.shape[0], first, groups)[rows, :, cols]  # (passing groups, first)
    which, member = (picked + by_group[cols] >= thr[rows][:, None]).nonzero(as_tuple=True)
    return rows[which], cols[which] + member * groups, picked[which, member]


def _screen(q: _Queries, rows: slice, refs: _Refs, k: int, limit: int) -> list[tuple[torch.Tensor, ...]] | None:
    """Per chunk, the (row, reference, z) triples that can reach the top-k; None past `limit`.

    Scores of up to PASS_BYTES of chunks are held so that they are opened with the final tau of
    the pass; later passes (huge reference sets) start from the tau reached so far, and what the
    earlier passes let through is filtered again at the end.
    """
    nrows, exact = rows.stop - rows.start, refs.precision == "fp32"
    first, second = _levels(refs.width, k)
    per_pass = max(1, PASS_BYTES // (4 * nrows * refs.width))
    top = torch.full((nrows, k), -math.inf)
    found, total = [], 0
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
        for chunk, z, level1 in held:
            cols = slice(chunk * refs.width, (chunk + 1) * refs.width)
            found.append(_extract(z, level1, first, thr, refs.slack[cols]))
            found[-1] = (found[-1][0], found[-1][1] + cols.start, found[-1][2])
            total += found[-1][0].numel()
            if total > limit:
                return None
    if len(refs.chunks) > per_pass:
        found = [tuple(t[z + 2 * refs.slack[c] >= thr[r]] for t in (r, c, z)) for r, c, z in found]
    return found


def _to_csr(found: list[tuple[torch.Tensor, ...]], nrows: int) -> tuple[torch.Tensor, ...]:
    """CSR row pointers, columns and z of triples given per chunk (rows ascending in each chunk),
    plus each pair's row and position in its row."""
    counts = sum(torch.bincount(rows, minlength=nrows) for rows, _, _ in found)
    crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    columns = torch.empty(int(crow[-1]), dtype=torch.int64)
    values = torch.empty(int(crow[-1]))
    rows_all, pos_all = [], []
    offset = torch.zeros(nrows, dtype=torch.int64)
    for rows, cols, z in found:
        seen = torch.bincount(rows, minlength=nrows)
        pos = offset[rows] + torch.arange(rows.numel()) - (torch.cumsum(seen, 0) - seen)[rows]
        columns[crow[rows] + pos], values[crow[rows] + pos] = cols, z
        rows_all.append(rows)
        pos_all.append(pos)
        offset += seen
    return crow, columns, values, torch.cat(rows_all), torch.cat(pos_all)


def _rerank(x: torch.Tensor, refs: _Refs, unit: torch.Tensor, crow: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """fp32 similarity fl(fl(q.x) / ||x||) of each pair, in CSR order.

    A sampled matmul computes just the requested dot products, one fused loop per pair and no
    gathered copies; it is the same loop for every pair, so duplicate references tie exactly.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, columns, torch.zeros(columns.numel()), size=(unit.shape[0], x.shape[0]),
                                          check_invariants=False)  # rows grouped, columns in range
    dots = torch.sparse.sampled_addmm(pattern, unit, x.T, beta=0.0).values()
    return dots * refs.inv_norm[columns] + 0.0  # +0.0 turns -0.0 into +0.0


def _select(crow: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
            k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row by (value descending, index ascending), via one int64 key per pair.

    Rows without k pairs (fallback rows) get garbage, to be overwritten by the caller.
    """
    flat = crow[rows] + pos
    bits = values[flat].view(torch.int32).long()
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotone in the float value
    key = torch.full((crow.numel() - 1, max(k, int(pos.max()) + 1)), INT64_MIN)
    key[rows, pos] = ordered * 2**32 + (2**32 - 1 - columns[flat])
    picked = (crow[:-1, None] + torch.topk(key, k, dim=1).indices).clamp_(max=columns.numel() - 1)
    return values[picked], columns[picked]


def _plain_topk(unit: torch.Tensor, refs: _Refs, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of unit query rows on the plain fp32 path (GEMM scores are the final values)."""
    q = _encode_queries(unit, refs, unit.shape[0])
    sims, idx = torch.empty(unit.shape[0], k), torch.empty(unit.shape[0], k, dtype=torch.int64)
    for s in range(0, unit.shape[0], 256):
        rows = slice(s, min(s + 256, unit.shape[0]))
        found = _screen(q, rows, refs, k, 2**62)
        assert found is not None
        crow, columns, values, at, pos = _to_csr(found, rows.stop - rows.start)
        sims[rows], idx[rows] = _select(crow, columns, values, at, pos, k)
    return sims, idx


def _screened_topk(x: torch.Tensor, unit: torch.Tensor, refs: _Refs, plain: Callable[[], _Refs], k: int, block: int,
                   limit: int, stats: KnnCpuStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of unit query rows (sorted by peak): screen per block, one re-rank for all rows.

    Working on all rows at once keeps the number of parallel regions small: each is a barrier,
    and a barrier stalls for a whole time slice whenever another process holds a core.
    """
    q = _encode_queries(unit, refs, block)
    found, fallback = [], []
    for s in range(0, unit.shape[0], block):
        rows = slice(s, min(s + block, unit.shape[0]))
        triples = _screen(q, rows, refs, k, limit * (rows.stop - rows.start))
        if triples is None:
            fallback.append(rows)
        else:
            found.extend((r + s, c, z) for r, c, z in triples)
    sims, idx = torch.empty(unit.shape[0], k), torch.empty(unit.shape[0], k, dtype=torch.int64)
    if found:
        crow, columns, _, at, pos = _to_csr(found, unit.shape[0])
        stats.candidates += columns.numel()
        sims, idx = _select(crow, columns, _rerank(x, refs, unit, crow, columns), at, pos, k)
    for rows in fallback:
        stats.fallback_queries += rows.stop - rows.start
        sims[rows], idx[rows] = _plain_topk(unit[rows], plain(), k)
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
    sends a block to the fp32 path when the screen cannot separate its neighbours.
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
    stats.precision, stats.queries = resolved, queries.shape[0]
    # Even chunks, each a multiple of both group sizes so that the levels tile it exactly.
    chunks = -(-reference.shape[0] // max(reference_chunk, 1))
    tile = GROUPS[0] * GROUPS[1]
    width = -(-reference.shape[0] // (chunks * tile)) * tile
    limit = candidate_limit or min(max(1024, reference.shape[0] // 8), 32768)
    previous = torch.get_float32_matmul_precision()
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
        for s in range(0, live.numel(), SUPER_BLOCKS * query_block):
            rows = live[s : s + SUPER_BLOCKS * query_block]
            if resolved == "fp32":
                sims[rows], idx[rows] = _plain_topk(qry[rows], refs, k)
            else:
                sims[rows], idx[rows] = _screened_topk(x, qry[rows], refs, plain, k, query_block, limit, stats)
    finally:
        torch.set_float32_matmul_precision(previous)
    return sims, idx
