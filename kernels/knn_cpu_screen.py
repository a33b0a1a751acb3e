"""Numba kernels of the exact CPU k-NN (kernels/knn_cpu.py, which holds the error bound).

- `encode_int8`: unit rows to int8 codes with one scale per row (or a given one), and ||r^ - r||;
  `encode_int8_groups` the same for references, one scale per group of GROUP rows.
- `scan_tile`: one GEMM tile of screen scores, per row: a running top-k heap of scores (its root is
  tau) and every column whose score z passes z + 2 b >= tau - 2 a_q appended to the row's buffer.
  Groups of 4 columns are opened only when a bound on their z + 2 b (a vector loop) can pass,
  listed branch-free first; int8 screens share one scale per group, so the bound is a maximum of
  raw int32 scores.
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

GROUP = 4  # columns per group (strided: column g + m * groups), one maximum each
SUPER = 16  # groups per run: one witness each for the first tile's floor of tau
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


@numba.njit(cache=True, nogil=True)
def _encode_row(x, i, inv, s, codes, scale, err):  # pragma: no cover - numba
    """codes[i, :d] = round(fl32(x_i inv) / s) clamped to [-127, 127]; scale[i] = s; err[i] = ||r - s Q||."""
    magic = np.float32(12582912.0)  # 1.5 * 2^23: (v + magic) - magic rounds |v| < 2^22 to an integer
    recip = np.float32(1.0) / s
    for u in range(x.shape[1]):
        c = (np.float32(x[i, u] * inv) * recip + magic) - magic
        codes[i, u] = np.int8(min(max(c, np.float32(-127.0)), np.float32(127.0)))
    scale[i], err[i] = s, _error_norm(x, i, inv, codes, s)


@numba.njit(parallel=True, cache=True, nogil=True)
def encode_int8(x, inv, given_scale, codes, scale, err):  # pragma: no cover - numba
    """Row i: r = fl32(x_i * inv_i), Q = round(r / s) in [-127, 127] into codes[i, :d] with s the
    given scale (when > 0) or max|r| / 127 (1 for a zero row); err_i = ||r - s Q|| (float64)."""
    for i in numba.prange(x.shape[0]):
        s = np.float32(given_scale[i])
        if s <= 0:
            peak = _peak(x, i, inv[i])
            s = np.float32(peak / np.float32(127.0)) if peak > 0 else np.float32(1.0)
        _encode_row(x, i, inv[i], s, codes, scale, err)


@numba.njit(parallel=True, cache=True, nogil=True)
def encode_int8_groups(x, inv, width, codes, scale, group_scale, err):  # pragma: no cover - numba
    """References in chunks of `width` rows (the last one padded past x's rows): group g of a chunk,
    rows g + m * width / GROUP (m < GROUP), shares the scale max|r| / 127 over its rows (1 when
    all are zero), written to group_scale; its real rows are encoded as in `encode_int8`."""
    per_chunk = width // GROUP
    for gi in numba.prange(group_scale.shape[0]):
        first = gi // per_chunk * width + gi % per_chunk
        peak = np.float32(0.0)
        for m in range(GROUP):
            i = first + m * per_chunk
            if i < x.shape[0]:
                peak = max(peak, _peak(x, i, inv[i]))
        s = np.float32(peak / np.float32(127.0)) if peak > 0 else np.float32(1.0)
        group_scale[gi] = s
        for m in range(GROUP):
            i = first + m * per_chunk
            if i < x.shape[0]:
                _encode_row(x, i, inv[i], s, codes, scale, err)


@numba.njit(cache=True, nogil=True, fastmath={"nnan", "nsz", "reassoc", "contract", "arcp"})
def _group_maxima(row, groups, qscale, col_scale, col_slack, group_scale, group_offset, out):  # pragma: no cover
    """out[g] >= max (z + 2 b) over group g = columns g + m * groups, m < GROUP, up to 2^-21 (fp32):
    with a scale shared by the group (group_scale[g] > 0, screens), the maximum of the raw scores
    times it plus group_offset[g] = max 2 b - min b; else (fp32 path) the maximum of the scaled
    scores. One branch-free vector loop over the GROUP slabs (slices, not row[m * groups + g]:
    numba's negative-index check on a sum blocks vectorizing)."""
    r0, r1, r2, r3 = row[:groups], row[groups : 2 * groups], row[2 * groups : 3 * groups], row[3 * groups : 4 * groups]
    if group_scale[0] > 0:
        for g in range(groups):  # raw maxima in the scores' own type (int32: exact)
            top = max(max(r0[g], r1[g]), max(r2[g], r3[g]))
            out[g] = np.float32(top) * (qscale * group_scale[g]) + group_offset[g]
    else:
        for g in range(groups):
            best = np.float32(r0[g]) * (qscale * col_scale[g]) - col_slack[g]
            for m in range(1, GROUP):
                c = m * groups + g
                best = max(best, np.float32(row[c]) * (qscale * col_scale[c]) - col_slack[c])
            out[g] = best + group_offset[g]


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
def _threshold(heap, heap_n, i, bound, exact, floors):  # pragma: no cover - numba
    """tau - 2 a_q - ROUNDING (exact mode: tau), tau the larger of the heap's root (once it holds
    k scores) and the row's floor; -inf before either exists."""
    tau = floors[i]
    if heap_n[i] == heap.shape[1]:
        tau = max(tau, np.float64(heap[i, 0]))
    if tau == -math.inf or exact:
        return tau
    return tau - 2.0 * bound[i] - ROUNDING


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


@numba.njit(cache=True, nogil=True)
def scan_tile(acc, ncols, first, qscale, scale, slack, group_scale, group_offset, group_bmax, col_slack, bound, exact,
              heap, heap_n, floors, cols, values, counts, limit, last, maxima):  # pragma: no cover - numba
    """Feed columns [0, ncols) of a tile of screen scores (global columns first + c) to each row's
    heap, appending every (column, z) with z + 2 b >= tau - 2 a_q (tau as it stands then: it only
    grows) to the row's buffer (twice `limit` wide: when full it is compacted; a screen row with
    more than `limit` pairs left then, or after the `last` tile, is marked OVERFLOW).

    The tile's width is a multiple of GROUP; group g holds columns g + m * width / GROUP; a group
    is opened only when its bound on z + 2 b can pass. scale, slack, group_scale, group_offset:
    the tile's columns/groups (contiguous copies: numba types a slice as non-contiguous); maxima:
    scratch of at least groups floats.

    A row whose heap is not yet full (its first tile) first gets a floor for tau: each group's
    bound minus its offset and max b is <= the z of the group's best column, so the k-th largest
    of those over k or more groups (or runs of groups) is <= the k-th best z (k distinct columns
    reach it)."""
    k, capacity = heap.shape[1], cols.shape[1]
    groups = acc.shape[1] // GROUP
    nsupers = -(-groups // SUPER)
    group_max = maxima[:groups]
    witness, chosen = np.empty(groups, dtype=np.float64), np.empty(groups, dtype=np.int32)
    for i in range(acc.shape[0]):
        n = counts[i]
        if n == OVERFLOW:
            continue
        row = acc[i]
        _group_maxima(row, groups, qscale, scale, slack, group_scale, group_offset, group_max)
        if heap_n[i] < k <= groups and ncols == acc.shape[1]:
            for g in range(groups):
                witness[g] = np.float64(group_max[g]) - np.float64(group_offset[g]) - np.float64(group_bmax[g]) - ROUNDING
            if nsupers >= k:  # one witness per run of groups: a short selection
                for sup in range(nsupers):
                    witness[sup] = witness[sup * SUPER : min(sup * SUPER + SUPER, groups)].max()
                floors[i] = max(floors[i], np.partition(witness[:nsupers], nsupers - k)[nsupers - k])
            else:
                floors[i] = max(floors[i], np.partition(witness, groups - k)[groups - k])
        t = _threshold(heap, heap_n, i, bound, exact, floors)
        # The groups that can pass, listed branch-free (a branch per group mispredicted often);
        # tau only grows, so the list is a superset of those still passing when opened.
        bar, opened = t - ROUNDING, 0
        for g in range(groups):
            chosen[opened] = g
            opened += np.float64(group_max[g]) >= bar
        for j in range(opened):
            g = chosen[j]
            if np.float64(group_max[g]) + ROUNDING >= t:
                for c in range(g, min(ncols, acc.shape[1]), groups):
                    z = _score(row, c, qscale, scale, slack)
                    if heap_n[i] < k:
                        _heap_push(heap, i, heap_n[i], z)
                        heap_n[i] += 1
                        t = _threshold(heap, heap_n, i, bound, exact, floors)
                    elif z > heap[i, 0]:
                        _heap_replace_root(heap, i, z)
                        t = _threshold(heap, heap_n, i, bound, exact, floors)
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
def finish_rows(q, x, inv_norm, col_slack, bound, exact, heap, cols, values, counts, sims, idx):  # pragma: no cover
    """Exact top-k of each row's buffered pairs into sims/idx (value descending, index ascending);
    OVERFLOW rows are left alone.

    Screen mode: of the pairs passing the final tau - 2 a_q, those with z >= tau (at least k) are
    re-ranked first; the smallest of their fp32 similarities, tau_e, is <= the exact k-th best, so
    a reference can only reach the top-k with z + 2 b >= tau_e - a_q: only those are re-ranked too."""
    k, capacity = sims.shape[1], cols.shape[1]
    exact_values, done = np.empty(capacity, dtype=np.float32), np.empty(capacity, dtype=np.bool_)
    todo, keys = np.empty(capacity, dtype=np.int64), np.empty(capacity, dtype=np.int64)
    four, sims4 = np.empty(4, dtype=np.int64), np.empty(4, dtype=np.float32)
    for i in range(cols.shape[0]):
        n = counts[i]
        if n == OVERFLOW:
            continue
        root = heap[i, 0]
        t = np.float64(root) if exact else np.float64(root) - 2.0 * bound[i] - ROUNDING
        m = 0  # the pairs passing the final threshold, moved to the front of the row
        for j in range(n):
            if np.float64(values[i, j]) + 2.0 * np.float64(col_slack[cols[i, j]]) >= t:
                cols[i, m], values[i, m] = cols[i, j], values[i, j]
                m += 1
        if not exact:
            # The heap's k scores are >= tau: the pairs with z >= tau are at least k references.
            count = 0
            for j in range(m):
                done[j] = False
                if values[i, j] >= root:
                    todo[count] = j
                    count += 1
            tau_e = math.inf
            for rank_pass in range(2):
                for s in range(0, count, 4):  # four at a time, the last four padded with repeats
                    for w in range(4):
                        four[w] = cols[i, todo[min(s + w, count - 1)]]
                    _similarities(q, i, x, four, inv_norm, sims4)
                    for w in range(min(4, count - s)):
                        j = todo[s + w]
                        exact_values[j], done[j] = sims4[w], True
                        tau_e = min(tau_e, np.float64(sims4[w])) if rank_pass == 0 else tau_e
                t2, count = tau_e - bound[i] - ROUNDING, 0
                for j in range(m):
                    if rank_pass == 0 and not done[j] and np.float64(values[i, j]) + 2.0 * np.float64(col_slack[cols[i, j]]) >= t2:
                        todo[count] = j
                        count += 1
            kept = 0
            for j in range(m):
                if done[j]:
                    cols[i, kept], values[i, kept] = cols[i, j], exact_values[j]
                    kept += 1
            m = kept
        best = np.argsort(_keys(values[i], cols[i], m, keys))[::-1][:k]
        for j in range(k):
            sims[i, j], idx[i, j] = values[i, best[j]], cols[i, best[j]]
