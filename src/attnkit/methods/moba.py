"""`moba`: Mixture of Block Attention (MoBA, Lu et al. 2025; "Optimizing MoBA").

Keys are cut into blocks of `block_size`. Per query head, the gate of query i for block b is
`s(i, b) = q_i . mean(k in block b)` (mean over the block's existing keys). Block b is a candidate
iff its first key is causally visible (`b * block_size <= i` after bottom-right alignment); the
query's own block is always selected and counts toward `topk`; the `topk` highest-gated candidates
are attended, the own block causally (the executor applies causality token by token). Without
causality every block is a candidate. Gradients flow through attention, not through the gate.

Selection: `KVSelection(indices [B, Hq, Tq, min(topk, Nk)], q_block=1, k_block=block_size)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.contract import AttentionCall, validate_attention
from ..core.selection import KVSelection, cdiv
from ..core.topk import streaming_topk, tile_budget, tile_sizes
from ..registry import MethodOptions
from ._routing import block_mean, check_int, compact_rows, compute_dtype, register_selection, seq_view


@dataclass(frozen=True)
class MobaOptions(MethodOptions):
    block_size: int
    topk: int

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size, 1)
        check_int("topk", self.topk, 1)


def policy(call: AttentionCall, opts: MobaOptions) -> KVSelection:
    """The MoBA selection of a validated call (no gradients)."""
    view = seq_view(call)
    bs = opts.block_size
    N, Tq, Hq, D = view.q.shape
    Hkv, G, nk = view.k.shape[2], Hq // view.k.shape[2], cdiv(view.tk, bs)
    with torch.no_grad():
        cd = compute_dtype(call.dtype)
        gate_keys = block_mean(view.k, bs, view.k_len).permute(0, 2, 3, 1).unsqueeze(2)  # [N, Hkv, 1, D, nk]
        qg = view.q.to(cd).view(N, Tq, Hkv, G, D).permute(0, 2, 3, 1, 4)  # [N, Hkv, G, Tq, D]
        q_pos = view.q_pos()
        first = torch.arange(nk, device=q_pos.device) * bs  # first key of each block [nk]
        k_len = view.k_len.view(N, 1, 1, 1, 1)

        def score(rows: slice, cols: slice) -> torch.Tensor:  # [N, Hq, R, C]
            s = torch.matmul(qg[..., rows, :], gate_keys[..., cols])  # [N, Hkv, G, R, C]
            p = q_pos[rows].view(-1, 1)
            f = first[cols].view(1, -1)
            cand = f < k_len
            if view.causal:
                cand = cand & (f <= p)
            s.masked_fill_(~cand, float("-inf"))  # in place: the tile is the only [R, C]-per-head temporary
            own = (p // bs) == torch.arange(cols.start, cols.stop, device=p.device).view(1, -1)
            return s.masked_fill_(own, float("inf")).reshape(N, Hq, s.shape[-2], s.shape[-1])

        def col_stop(rows: slice) -> int:
            return (rows.stop - 1 + view.offset) // bs + 1 if view.causal else nk

        dev = q_pos.device
        per_pair = N * Hq * 2
        row_chunk, col_chunk = tile_sizes(Tq, nk, elems_per_pair=per_pair, device=dev)
        _, idx = streaming_topk(score, (N, Hq), Tq, nk, opts.topk, row_chunk=row_chunk, col_chunk=col_chunk,
                                col_stop=col_stop, dtype=cd, device=dev,
                                max_tile_elems=tile_budget(dev) // per_pair)
    return KVSelection(compact_rows(idx, opts.topk), q_block=1, k_block=bs)


def select(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int, causal: bool = True,
           cu_seqlens: Optional[torch.Tensor] = None) -> KVSelection:
    """MoBA's selection for `q: [B, Tq, Hq, D]`, `k: [B, Tk, Hkv, D]`: per query head, the own block
    plus the `topk - 1` past blocks with the highest gate `q . mean(k in block)`.

    Returns `KVSelection(indices int32 [B (N under varlen), Hq, Tq, min(topk, Nk)], 1, block_size)`."""
    call = validate_attention(q, k, k, causal=causal, cu_seqlens=cu_seqlens)
    opts = MobaOptions(block_size, topk)
    opts.check_call(call)
    return policy(call, opts)


def _example(call: AttentionCall) -> dict[str, Any]:
    block = max(1, min(64, call.tk // 8))
    return {"block_size": block, "topk": 3}


SPEC = register_selection(
    name="moba",
    family="sparse",
    paper="MoBA: Mixture of Block Attention; Optimizing MoBA",
    summary="per query head, the own block plus the top-k past key blocks by q . mean(k in block)",
    options=MobaOptions,
    select=policy,
    example=_example,
)
