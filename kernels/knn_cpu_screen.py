"""Numba kernels of the exact CPU k-NN (kernels/knn_cpu.py, which holds the error bound).

- `encode_int8`: unit rows to int8 codes with one scale per row (or a given one), and ||r^ - r||.
- `scan_tile`: one GEMM tile of screen scores, per row: a running top-k heap of scores (its root is
  tau) and every column whose score z passes z + 2 b >= tau - 2 a_q appended to the row's buffer.
  A vector loop flags the columns that can pass (one byte each); the flags are read 8 at a time
  and only the set ones visited (few pass once tau has settled).
- `finish_rows`: per row, the exact fp32 top-k among the buffered candidates (tie rule: larger
  similarity, then smaller index), re-ranking as few as the bound allows.

Score of column c in a tile: z = fl32(acc * (qscale * col_scale[c]) - col_slack[c]) (in float64 first).
With qscale = 1, col_scale = 1/||x||, col_slack = 0 that is the plain fp32 path's final value
fl(fl(q.x) / ||x||) ("exact" mode: thresholds are tau itself, nothing is re-ranked).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba.cpython.unsafe.numbers import trailing_zeros

PAD = 16  # chunk widths and int8 code widths are multiples of this
ROUNDING = 2.0**-20  # covers fp32 rounding of screen-scale values (|v| < 2) in thresholds
OVERFLOW = -1  # a row's count when its candidates passed the limit: the row is redone in fp32


@numba.njit(cache=True, nogil=True, fastmath={"nnan", "nsz", "reassoc"})
def _peak(x, i, scale):  # pragma: no cover - numba
    """max |fl32(x_i * scale)| = fl32(max |x_i| * scale) for scale >= 0 (rounding is monotone and
    symmetric), so the loop is a plain maximum that vectorizes."""
    top = np.float32(0.0)
    for u in range(x.shape[1]):
        top = max(top, abs(x[i, u]))
    return np.float32(top * scale)


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _error_norm(x, i, scale, codes, s):  # pragma: no cover - numba
    """||r - s Q|| in float64 (the sum's order only moves it by ~d 2^-53, inside the caller's margin)."""
    total = 0.0
    for u in range(x.shape[1]):
        diff = np.float64(np.float32(x[i, u] * scale)) - np.float64(codes[i, u]) * np.float64(s)
        total += diff * diff
    return math.sqrt(total)


@numba.njit(parallel=True, cache=True, nogil=True)
def encode_int8(x, inv, given_scale, codes, scale, err):  # pragma: no cover - numba
    """Row i: r = fl32(x_i * inv_i), Q = round(r / s) in [-127, 127] into codes[i, :d] with s the
    given scale (when > 0) or max|r| / 127 (1 for a zero row); err_i = ||r - s Q|| (float64)."""
    magic = np.float32(12582912.0)  # 1.5 * 2^23: (v + magic) - magic rounds |v| < 2^22 to an integer
    for i in numba.prange(x.shape[0]):
        s = np.float32(given_scale[i])
        if s <= 0:
            peak = _peak(x, i, inv[i])
            s = np.float32(peak / np.float32(127.0)) if peak > 0 else np.float32(1.0)
        recip = np.float32(1.0) / s
        for u in range(x.shape[1]):
            c = (np.float32(x[i, u] * inv[i]) * recip + magic) - magic
            codes[i, u] = np.int8(min(max(c, np.float32(-127.0)), np.float32(127.0)))
        scale[i], err[i] = s, _error_norm(x, i, inv[i], codes, s)


@numba.njit(cache=True, nogil=True, inline="always")
def _score(row, c, qscale, col_scale, col_slack):  # pragma: no cover - numba
    """z = fl32(acc * (qscale * col_scale) - col_slack), computed in float64."""
    return np.float32(np.float64(row[c]) * (np.float64(qscale) * np.float64(col_scale[c])) - np.float64(col_slack[c]))


@numba.njit(cache=True, nogil=True)
def _heap_push(heap, i, size, value):  # pragma: no cover - numba
    """Insert into row i's min-heap of `size` (< capacity) entries."""
    j = size
    while j > 0:
        parent = (j - 1) // 2
        if heap[i, parent] <= value:
            break
        heap[i, j] = heap[i, parent]
        j = parent
    heap[i, j] = value


@numba.njit(cache=True, nogil=True)
def _heap_replace_root(heap, i, value):  # pragma: no cover - numba
    k = heap.shape[1]
    j = 0
    while True:
        child = 2 * j + 1
        if child >= k:
            break
        if child + 1 < k and heap[i, child + 1] < heap[i, child]:
            child += 1
        if heap[i, child] >= value:
            break
        heap[i, j] = heap[i, child]
        j = child
    heap[i, j] = value


@numba.njit(cache=True, nogil=True)
def _threshold(heap, heap_n, i, bound, exact):  # pragma: no cover - numba
    """tau - 2 a_q - ROUNDING (exact mode: tau), tau the heap's root once it holds k scores; -inf before."""
    if heap_n[i] < heap.shape[1]:
        return -math.inf
    tau = np.float64(heap[i, 0])
    return tau if exact else tau - 2.0 * bound[i] - ROUNDING


@numba.njit(cache=True, nogil=True)
def _keys(values, cols, count, out):  # pragma: no cover - numba
    """out[:count]: int64 keys ordering (value descending, column ascending) as keys descending."""
    bits = values[:count].view(np.int32)
    for j in range(count):
        b = np.int64(bits[j])
        out[j] = (b if b >= 0 else b ^ 0x7FFFFFFF) * 2**32 + (2**32 - 1 - np.int64(cols[j]))
    return out[:count]


@numba.njit(cache=True, nogil=True)
def _compact(i, t, tau, exact, col_slack, cols, values, n, k, limit):  # pragma: no cover - numba
    """Drop the row's pairs that can no longer pass; OVERFLOW when more than `limit` remain (screen).
    Exact mode keeps the top k by the tie rule when too many exact ties remain."""
    m = 0
    for j in range(n):
        if np.float64(values[i, j]) + 2.0 * np.float64(col_slack[cols[i, j]]) >= t:
            cols[i, m], values[i, m] = cols[i, j], values[i, j]
            m += 1
    if not exact:
        return m if m <= limit else OVERFLOW
    if 2 * m > cols.shape[1]:
        order = np.argsort(_keys(values[i], cols[i], m, np.empty(m, dtype=np.int64)))[::-1][:k]
        kept_cols, kept_values = cols[i][order], values[i][order]
        m = order.shape[0]
        cols[i, :m], values[i, :m] = kept_cols, kept_values
    return m


@numba.njit(cache=True, nogil=True, fastmath={"nnan", "nsz", "contract", "arcp"})
def _column_flags(row, ncols, qscale, scale, slack, bar, flags):  # pragma: no cover - numba
    """flags[c] = 1 where fl32(row[c] * (qscale * scale[c]) + slack[c]) >= bar, c < ncols (0 past it):
    z + 2 b in fp32, within 2^-21 of the exact value for |z + 2 b| < 2 (a vector loop), so a bar
    ROUNDING below the threshold flags every column that passes it."""
    for c in range(ncols):
        flags[c] = np.float32(row[c]) * (qscale * scale[c]) + slack[c] >= bar
    flags[ncols:] = 0


@numba.njit(cache=True, nogil=True)
def scan_tile(acc, ncols, first, qscale, scale, slack, col_slack, bound, exact, heap, heap_n, cols, values, counts,
              limit, last):  # pragma: no cover - numba
    """Feed columns [0, ncols) of a tile of screen scores (global columns first + c) to each row's
    heap, appending every (column, z) with z + 2 b >= tau - 2 a_q to the row's buffer (twice
    `limit` wide: when full it is compacted; a screen row with more than `limit` pairs left then,
    or after the `last` tile, is marked OVERFLOW). scale, slack: the tile's columns (contiguous).

    A row whose heap is not full (its first tile) offers the tile's scores to the heap first (only
    those that can be among its k best), so its tau is the tile's k-th best before anything is
    appended. Then a vector pass flags the columns whose z + 2 b can reach tau - 2 a_q as it stands
    (it only grows, so earlier tiles kept a superset), and only the flagged ones are visited."""
    k, capacity = heap.shape[1], cols.shape[1]
    flags = np.zeros(-(-acc.shape[1] // 8) * 8, dtype=np.uint8)
    words = flags.view(np.uint64)
    scores, selection = np.empty(acc.shape[1], dtype=np.float32), np.empty((1, k), dtype=np.float32)
    for i in range(acc.shape[0]):
        n = counts[i]
        if n == OVERFLOW:
            continue
        row = acc[i]
        offered = heap_n[i] < k
        if offered:  # every score that can be among the tile's k best into the heap
            for c in range(ncols):
                scores[c] = _score(row, c, qscale, scale, slack)
            floor = -math.inf
            blocks = ncols // 8
            if heap_n[i] == 0 and blocks >= k:
                # The k-th largest maximum of k or more blocks (b + j * blocks, j < 8) is <= the
                # k-th largest score (k distinct columns reach it): a floor that skips most offers.
                for b in range(blocks):
                    top = scores[b]
                    for j in range(1, 8):
                        top = max(top, scores[b + j * blocks])
                    if b < k:
                        _heap_push(selection, 0, b, top)
                    elif top > selection[0, 0]:
                        _heap_replace_root(selection, 0, top)
                floor = selection[0, 0]
            for c in range(ncols):
                z = scores[c]
                if z < floor:
                    continue
                if heap_n[i] < k:
                    _heap_push(heap, i, heap_n[i], z)
                    heap_n[i] += 1
                elif z > heap[i, 0]:
                    _heap_replace_root(heap, i, z)
        t = _threshold(heap, heap_n, i, bound, exact)
        _column_flags(row, ncols, qscale, scale, slack, np.float32(t - ROUNDING), flags)
        for w in range(-(-ncols // 8)):
            word = words[w]
            while word != 0:  # the set flags of 8 columns, lowest first
                c = 8 * w + (trailing_zeros(word) >> 3)
                word &= word - np.uint64(1)
                z = _score(row, c, qscale, scale, slack)
                if not offered and z > heap[i, 0]:
                    _heap_replace_root(heap, i, z)
                    t = _threshold(heap, heap_n, i, bound, exact)
                # Branch-free append (an unpredictable branch here cost more than the rest):
                # the slot is always written, and kept when the pair passes.
                cols[i, n], values[i, n] = first + c, z
                n += np.float64(z) + 2.0 * np.float64(slack[c]) >= t
                if n == capacity:
                    n = _compact(i, t, heap[i, 0], exact, col_slack, cols, values, n, k, limit)
                    if n == OVERFLOW or n == capacity:
                        n = OVERFLOW
                        break
            if n == OVERFLOW:
                break
        if last and n != OVERFLOW and not exact and n > limit:
            n = _compact(i, t, heap[i, 0], exact, col_slack, cols, values, n, k, limit)
        counts[i] = n


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _similarities(q, i, x, c, inv_norm, out):  # pragma: no cover - numba
    """out[m] = fl(fl(q_i . x_c[m]) / ||x_c[m]||), m < 4 (any summation order meets the gamma_d
    bound; four rows at once keep four streams of memory reads in flight). Called from one place
    only, always on four rows, so every pair is summed in the same order and duplicates tie exactly."""
    a0 = a1 = a2 = a3 = np.float32(0.0)
    x0, x1, x2, x3, qi = x[c[0]], x[c[1]], x[c[2]], x[c[3]], q[i]
    for u in range(q.shape[1]):
        a0 += qi[u] * x0[u]
        a1 += qi[u] * x1[u]
        a2 += qi[u] * x2[u]
        a3 += qi[u] * x3[u]
    out[0] = a0 * inv_norm[c[0]] + np.float32(0.0)  # +0.0 turns -0.0 into +0.0
    out[1] = a1 * inv_norm[c[1]] + np.float32(0.0)
    out[2] = a2 * inv_norm[c[2]] + np.float32(0.0)
    out[3] = a3 * inv_norm[c[3]] + np.float32(0.0)


@numba.njit(cache=True, nogil=True)
def _top_keys(keys, count, k, top, where):  # pragma: no cover - numba
    """The k largest of keys[:count] (distinct), largest first, into top[:k] and their positions into
    where[:k]: one insertion per key that beats the k-th (few, after the first k)."""
    size = 0
    for j in range(count):
        key = keys[j]
        if size == k and key <= top[k - 1]:
            continue
        p = size if size < k else k - 1
        while p > 0 and top[p - 1] < key:
            top[p], where[p] = top[p - 1], where[p - 1]
            p -= 1
        top[p], where[p] = key, j
        size += size < k


@numba.njit(cache=True, nogil=True)
def _rerank(q, i, x, inv_norm, pending, w, ranked_cols, ranked_values, ranked, exact_heap, sims4):  # pragma: no cover
    """Re-rank the columns pending[:w] (w <= 4; the four rows padded with repeats) in fp32, append
    them to the ranked pairs and offer them to the min-heap of the k best exact values; the new count."""
    for v in range(w, 4):
        pending[v] = pending[w - 1]
    _similarities(q, i, x, pending, inv_norm, sims4)
    k = exact_heap.shape[1]
    for v in range(w):
        ranked_cols[ranked], ranked_values[ranked] = pending[v], sims4[v]
        if ranked < k:
            _heap_push(exact_heap, 0, ranked, sims4[v])
        elif sims4[v] > exact_heap[0, 0]:
            _heap_replace_root(exact_heap, 0, sims4[v])
        ranked += 1
    return ranked


@numba.njit(cache=True, nogil=True)
def finish_rows(q, x, inv_norm, col_slack, bound, exact, heap, cols, values, counts, sims, idx):  # pragma: no cover
    """Exact top-k of each row's buffered pairs into sims/idx (value descending, index ascending);
    OVERFLOW rows are left alone.

    Screen mode: of the pairs passing the final tau - 2 a_q, those with z >= tau (at least k) are
    re-ranked first; the k-th best of the fp32 similarities re-ranked so far, tau_e, is <= the exact
    k-th best, so a reference can only reach the top-k with z + 2 b >= tau_e - a_q: only those are
    re-ranked too, four at a time, tau_e rising as they come in."""
    k, capacity = sims.shape[1], cols.shape[1]
    ranked_cols, ranked_values = np.empty(capacity, dtype=np.int32), np.empty(capacity, dtype=np.float32)
    todo, keys = np.empty(capacity, dtype=np.int64), np.empty(capacity, dtype=np.int64)
    top, where = np.empty(k, dtype=np.int64), np.empty(k, dtype=np.int64)
    pending, sims4 = np.empty(4, dtype=np.int64), np.empty(4, dtype=np.float32)
    exact_heap = np.empty((1, k), dtype=np.float32)
    for i in range(cols.shape[0]):
        n = counts[i]
        if n == OVERFLOW:
            continue
        row_cols, row_values = cols[i], values[i]
        root = heap[i, 0]
        t = np.float64(root) if exact else np.float64(root) - 2.0 * bound[i] - ROUNDING
        m = 0  # the pairs passing the final threshold, moved to the front of the row
        for j in range(n):
            if np.float64(row_values[j]) + 2.0 * np.float64(col_slack[row_cols[j]]) >= t:
                row_cols[m], row_values[m] = row_cols[j], row_values[j]
                m += 1
        if not exact:
            # The heap's k scores are >= tau: the pairs with z >= tau are at least k references.
            ranked, count, w = 0, 0, 0
            for j in range(m):  # listed branch-free
                todo[count] = j
                count += row_values[j] >= root
            for s in range(count):
                pending[w] = row_cols[todo[s]]
                w += 1
                if w == 4 or s == count - 1:
                    ranked = _rerank(q, i, x, inv_norm, pending, w, ranked_cols, ranked_values, ranked, exact_heap, sims4)
                    w = 0
            bar = np.float64(exact_heap[0, 0]) - bound[i] - ROUNDING
            for j in range(m):
                z = row_values[j]
                if z < root and np.float64(z) + 2.0 * np.float64(col_slack[row_cols[j]]) >= bar:
                    pending[w] = row_cols[j]
                    w += 1
                    if w == 4:
                        ranked = _rerank(q, i, x, inv_norm, pending, w, ranked_cols, ranked_values, ranked, exact_heap,
                                         sims4)
                        w, bar = 0, np.float64(exact_heap[0, 0]) - bound[i] - ROUNDING
            if w > 0:
                ranked = _rerank(q, i, x, inv_norm, pending, w, ranked_cols, ranked_values, ranked, exact_heap, sims4)
            row_cols, row_values, m = ranked_cols, ranked_values, ranked
        _top_keys(_keys(row_values, row_cols, m, keys), m, k, top, where)
        for j in range(k):
            sims[i, j], idx[i, j] = row_values[where[j]], row_cols[where[j]]
