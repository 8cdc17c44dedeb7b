"""Streaming top-k over keys: the `k` best columns of a score matrix that is never materialised.

The lesson of StreamIndex (and of DeepSeek Sparse Attention's lightning indexer at long context):
the indexer scores `I[i, j]` form a `[Tq, Tk]` matrix (16 GiB in float32 at T = 65536), but top-k
only needs, per query, the best `k` seen so far. Scores are produced tile by tile (a chunk of
query rows against a chunk of key columns) and merged into a running `[rows, k]` top-k, so memory
is O(Tq * k + row_chunk * col_chunk) and no `[T, T]` tensor exists. On the CPU a tile is first
tested against each row's current k-th best score, so late tiles (where few keys can still enter
the top-k) cost a comparison and a small top-k instead of a full one.

Conventions shared by every caller (DSA, block top-k, MoBA, NSA):
- a score of `-inf` marks a column that is not a candidate; it is never returned (index -1);
- a score of `+inf` marks a forced column (always kept, ahead of every finite score);
- ties between equal finite scores are broken arbitrarily (as `torch.topk`).

Tiles depend on the device (`tile_budget`, `tile_sizes(..., device=)`). On the CPU a tile holds
`TILE_BUDGET` scores (16 MiB in float32) and at most `CPU_MAX_COLS` columns: memory stays small
and the per-tile pruning above pays off. On an accelerator the cost is the number of kernel
launches and host syncs, not the memory, so a tile holds up to `CUDA_TILE_BUDGET` scores (512 MiB
in float32, counting the caller's per-pair temporaries), spans every column, and rows are grown while
the causal column limit leaves room (`max_tile_elems`): a 64K-token MoBA or NSA selection (Hq = 16,
block 64) is 11 tiles instead of 512, DSA's (a score per key) 130 instead of 3291, and the CUDA path
makes no host sync.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .contract import AttnkitError

# score(rows, cols) -> [*batch_shape, len(rows), len(cols)]
ScoreFn = Callable[[slice, slice], torch.Tensor]

TILE_BUDGET = 1 << 22  # CPU: score elements (times the caller's per-pair cost) per tile: 16 MiB in float32
CPU_MAX_COLS = 4096  # CPU: columns per tile
CUDA_TILE_BUDGET = 1 << 27  # accelerators: 512 MiB of float32 per tile, and no column limit


def on_accelerator(device: Optional[torch.device | str]) -> bool:
    """True for a device where launches and host syncs, not memory, bound the selection (CUDA and the like)."""
    return device is not None and torch.device(device).type not in ("cpu", "meta")


def tile_budget(device: Optional[torch.device | str] = None) -> int:
    """Score elements per tile on `device` (the CPU budget when None)."""
    return CUDA_TILE_BUDGET if on_accelerator(device) else TILE_BUDGET


def tile_sizes(num_rows: int, num_cols: int, elems_per_pair: int = 1, budget: Optional[int] = None,
               max_cols: Optional[int] = None, device: Optional[torch.device | str] = None) -> tuple[int, int]:
    """`(row_chunk, col_chunk)` so that one tile holds about `budget / elems_per_pair` scores.

    `budget` defaults to `tile_budget(device)`; `max_cols` to `CPU_MAX_COLS` on the CPU and to every
    column on an accelerator (as many as the budget allows for one row)."""
    if budget is None:
        budget = tile_budget(device)
    per_row_cap = max(1, budget // max(1, elems_per_pair))
    if max_cols is None:
        max_cols = per_row_cap if on_accelerator(device) else CPU_MAX_COLS
    col = max(1, min(num_cols, max_cols))
    row = max(1, min(num_rows, budget // max(1, col * elems_per_pair)))
    return row, col


def grown_rows(r0: int, rows: int, num_rows: int, col_chunk: int, num_cols: int,
                col_stop: Callable[[slice], int], max_tile_elems: int) -> int:
    """Double a row chunk while its widest tile (`min(col_chunk, col_stop)` columns) stays within
    `max_tile_elems` scores: under causality the first rows see few columns."""
    while r0 + rows < num_rows:
        bigger = min(2 * rows, num_rows - r0)
        stop = max(1, min(num_cols, int(col_stop(slice(r0, r0 + bigger)))))
        if bigger * min(col_chunk, stop) > max_tile_elems:
            break
        rows = bigger
    return rows


def streaming_topk(
    score: ScoreFn,
    batch_shape: Sequence[int],
    num_rows: int,
    num_cols: int,
    k: int,
    *,
    row_chunk: int,
    col_chunk: int,
    col_stop: Optional[Callable[[slice], int]] = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    max_tile_elems: Optional[int] = None,
    ordered: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k of a `[*batch_shape, num_rows, num_cols]` score matrix given tile by tile.

    `score(rows, cols)` returns the tile `[*batch_shape, R, C]`. `col_stop(rows)` (optional) bounds
    the columns any row of the chunk can select (causal skipping: later tiles are not computed).
    Returns `(values, indices)`, each `[*batch_shape, num_rows, min(k, num_cols)]`, sorted by value
    descending per row (in no particular order with `ordered=False`: one sort less, for callers that
    reorder the rows by index anyway); `indices` is int32 with -1 (and `values` -inf) where a row has
    fewer than `k` candidates. Memory: the outputs plus one tile and a `[R, 2k]` merge buffer.

    `max_tile_elems` (with `col_stop`): a row chunk grows (doubling, from `row_chunk`) while its
    widest tile holds at most that many scores, so the short rows of a causal call share a tile.
    On the CPU each tile is first pruned against the running k-th best (one host sync per tile);
    on an accelerator no host sync is made.
    """
    for name, val in (("k", k), ("row_chunk", row_chunk), ("col_chunk", col_chunk)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise AttnkitError(f"{name}: expected an int >= 1, got {val!r}")
    if num_rows < 0 or num_cols < 0:
        raise AttnkitError(f"num_rows, num_cols: expected >= 0, got {num_rows}, {num_cols}")
    width = min(k, num_cols)
    values = torch.full((*batch_shape, num_rows, width), float("-inf"), dtype=dtype, device=device)
    indices = torch.full((*batch_shape, num_rows, width), -1, dtype=torch.int32, device=device)
    if width == 0:
        return values, indices
    # threshold pruning costs a host sync per tile: worth it on the CPU, where topk dominates
    prune = not on_accelerator(device)
    r0 = 0
    while r0 < num_rows:
        n_rows = min(row_chunk, num_rows - r0)
        if max_tile_elems is not None and col_stop is not None:
            n_rows = grown_rows(r0, n_rows, num_rows, col_chunk, num_cols, col_stop, max_tile_elems)
        rows = slice(r0, r0 + n_rows)
        r0 += n_rows
        stop = num_cols if col_stop is None else max(0, min(num_cols, int(col_stop(rows))))
        best_v: Optional[torch.Tensor] = None
        best_i: Optional[torch.Tensor] = None
        for c0 in range(0, stop, col_chunk):
            cols = slice(c0, min(c0 + col_chunk, stop))
            s = score(rows, cols)
            kk = min(width, s.shape[-1])
            if prune and best_v is not None and best_v.shape[-1] == width:
                # only scores above a row's current k-th best can enter its top-k
                beats = int((s > best_v.amin(-1, keepdim=True)).sum(-1).max())
                if beats == 0:
                    continue
                kk = min(kk, beats)
            v, i = s.topk(kk, dim=-1, sorted=False)
            i = i.add_(c0)
            if best_v is not None:
                v, i = torch.cat([best_v, v], -1), torch.cat([best_i, i], -1)
                v, j = v.topk(min(width, v.shape[-1]), dim=-1, sorted=False)
                i = i.gather(-1, j)
            best_v, best_i = v, i
        if best_v is None:
            continue
        if ordered:
            best_v, order = best_v.sort(dim=-1, descending=True)
            best_i = best_i.gather(-1, order)
        n = best_v.shape[-1]
        values[..., rows, :n] = best_v.to(dtype)
        dropped = torch.isneginf(best_v)
        indices[..., rows, :n] = torch.where(dropped, torch.full_like(best_i, -1), best_i).to(torch.int32)
    return values, indices
