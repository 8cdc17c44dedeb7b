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
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .contract import AttnkitError

# score(rows, cols) -> [*batch_shape, len(rows), len(cols)]
ScoreFn = Callable[[slice, slice], torch.Tensor]

TILE_BUDGET = 1 << 22  # score elements (times the caller's per-pair cost) per tile: 16 MiB in float32


def tile_sizes(num_rows: int, num_cols: int, elems_per_pair: int = 1, budget: int = TILE_BUDGET,
               max_cols: int = 4096) -> tuple[int, int]:
    """`(row_chunk, col_chunk)` so that one tile holds about `budget / elems_per_pair` scores."""
    col = max(1, min(num_cols, max_cols))
    row = max(1, min(num_rows, budget // max(1, col * elems_per_pair)))
    return row, col


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k of a `[*batch_shape, num_rows, num_cols]` score matrix given tile by tile.

    `score(rows, cols)` returns the tile `[*batch_shape, R, C]`. `col_stop(rows)` (optional) bounds
    the columns any row of the chunk can select (causal skipping: later tiles are not computed).
    Returns `(values, indices)`, each `[*batch_shape, num_rows, min(k, num_cols)]`, sorted by value
    descending per row; `indices` is int32 with -1 (and `values` -inf) where a row has fewer than
    `k` candidates. Memory: the outputs plus one tile and a `[R, 2k]` merge buffer.
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
    prune = torch.device(device).type == "cpu"
    for r0 in range(0, num_rows, row_chunk):
        rows = slice(r0, min(r0 + row_chunk, num_rows))
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
        best_v, order = best_v.sort(dim=-1, descending=True)
        best_i = best_i.gather(-1, order)
        n = best_v.shape[-1]
        values[..., rows, :n] = best_v.to(dtype)
        dropped = torch.isneginf(best_v)
        indices[..., rows, :n] = torch.where(dropped, torch.full_like(best_i, -1), best_i).to(torch.int32)
    return values, indices
