"""Bounded host memory for the k-NN: inputs read in row blocks, top-k merged across reference blocks.

Owns `blocked_topk`, which runs a backend's exact search on blocks of at most `chunk_bytes` of fp32
rows (queries and references alike) and merges the per-block top-k. The merge keeps the tie rule:
each block's list is ranked by similarity with ties to the smaller index, earlier blocks hold smaller
indices, and a stable sort of (best so far, new block) puts them first among equals. Blocks of a
read-only np.memmap (the probe's cache entries) are copied out and their pages dropped from the
process's resident set right after (`madvise(MADV_DONTNEED)`; they stay in the page cache), so
reading an N × D file costs one block of RSS, not the file's size.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable

import numpy as np
import torch

HOST_CHUNK_BYTES = 128 << 20  # bytes per block of rows (fp32 here): the bound on what one block holds in RAM;
# the CUDA search's pinned reference chunks take the same bound in their storage dtype (knn_cuda.py)

Search = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def rows_per_block(width: int, chunk_bytes: int) -> int:
    """Rows of `width` fp32 values that fit in `chunk_bytes` (at least one)."""
    return max(1, chunk_bytes // (4 * max(width, 1)))


def fits_one_block(array: torch.Tensor | np.ndarray, chunk_bytes: int) -> bool:
    return array.shape[0] <= rows_per_block(array.shape[1], chunk_bytes)


def release_pages(view: np.ndarray) -> None:
    """Drop the pages of a read-only memmap view from this process's resident set (a no-op otherwise)."""
    mapping = getattr(view, "_mmap", None)
    if not isinstance(view, np.memmap) or mapping is None or view.mode != "r" or not hasattr(mmap, "MADV_DONTNEED"):
        return
    base = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
    start = view.ctypes.data - base
    first = start // mmap.PAGESIZE * mmap.PAGESIZE
    length = min(start + view.nbytes, len(mapping)) - first
    if length > 0:
        mapping.madvise(mmap.MADV_DONTNEED, first, length)


def read_rows(array: torch.Tensor | np.ndarray, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) as a tensor: a view of a tensor, an in-memory copy of an array or memmap."""
    if isinstance(array, torch.Tensor):
        return array[start:stop]
    view = array[start:stop]
    block = torch.from_numpy(np.array(view))
    release_pages(view)
    return block


def merge_topk(best: tuple[torch.Tensor, torch.Tensor] | None, block: tuple[torch.Tensor, torch.Tensor],
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of the lists so far and a later block's (similarity descending, ties to the earlier entry)."""
    if best is None:
        return block
    sims, idx = torch.cat([best[0], block[0]], dim=1), torch.cat([best[1], block[1]], dim=1)
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
    return sims.gather(1, order), idx.gather(1, order)


def blocked_topk(reference: torch.Tensor | np.ndarray, queries: torch.Tensor | np.ndarray, k: int, search: Search, *,
                 chunk_bytes: int = HOST_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """`search` over blocks of queries and references (each at most `chunk_bytes` as fp32), merged to the top-k."""
    ref_rows = rows_per_block(reference.shape[1], chunk_bytes)
    query_rows = rows_per_block(queries.shape[1], chunk_bytes)
    sims, indices = [], []
    for q_start in range(0, queries.shape[0], query_rows):
        block = read_rows(queries, q_start, q_start + query_rows)
        best: tuple[torch.Tensor, torch.Tensor] | None = None
        for r_start in range(0, reference.shape[0], ref_rows):
            refs = read_rows(reference, r_start, r_start + ref_rows)
            found_sims, found_idx = search(refs, block, min(k, refs.shape[0]))
            best = merge_topk(best, (found_sims, found_idx + r_start), k)
            del refs
        assert best is not None
        sims.append(best[0])
        indices.append(best[1])
    return torch.cat(sims), torch.cat(indices)
