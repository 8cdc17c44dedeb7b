"""`block_topk`: training-free block-sparse prefill (MInference / FlexPrefill-style block sparse; DHSA).

Queries and keys are cut into blocks of `block_size` (query blocks in query coordinates). Per
query head, the score of key block m for query block n is `mean(q in n) . mean(k in m)`; key block
m is a candidate iff its first key is causally visible to the block's last query. Each query block
keeps the `topk` best candidates plus, always and in addition, the first `sinks` key blocks and its
`local` blocks: the key blocks holding the block's own (aligned) positions and the `local - 1`
blocks before them. Causality still applies token by token. For pretrained models: no training.

Selection: `KVSelection(indices [B, Hq, ceil(Tq / block_size), S], q_block=k_block=block_size)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.checks import check_int
from ..core.contract import AttentionCall
from ..core.selection import KVSelection, cdiv
from ..core.topk import streaming_topk, tile_sizes
from ..registry import MethodOptions, register_selection
from .gemm import compute_dtype
from .router import block_mean, compact_rows, seq_view


@dataclass(frozen=True)
class BlockTopkOptions(MethodOptions):
    block_size: int
    topk: int
    sinks: int = 1  # leading key blocks always kept
    local: int = 1  # diagonal key blocks (and those before) always kept

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size, 1)
        check_int("topk", self.topk, 1)
        check_int("sinks", self.sinks, 0)
        check_int("local", self.local, 0)


def policy(call: AttentionCall, opts: BlockTopkOptions) -> KVSelection:
    """The block top-k selection of a validated call (no gradients)."""
    view = seq_view(call)
    bs = opts.block_size
    N, Tq, Hq, D = view.q.shape
    Hkv, G = view.k.shape[2], Hq // view.k.shape[2]
    nq, nk = cdiv(Tq, bs), cdiv(view.tk, bs)
    dev = view.q.device
    with torch.no_grad():
        cd = compute_dtype(call.dtype)
        q_len = view.k_len if view.packing is not None else torch.full_like(view.k_len, Tq)
        qm = block_mean(view.q, bs, q_len).view(N, nq, Hkv, G, D).permute(0, 2, 3, 1, 4)  # [N, Hkv, G, nq, D]
        km = block_mean(view.k, bs, view.k_len).permute(0, 2, 3, 1).unsqueeze(2)  # [N, Hkv, 1, D, nk]
        n = torch.arange(nq, device=dev)
        first_pos = n * bs + view.offset  # [nq]
        last_pos = torch.minimum((n + 1) * bs, q_len.view(-1, 1)) - 1 + view.offset  # [N, nq]
        last_pos = torch.maximum(last_pos, first_pos)
        k_blocks = (view.k_len + bs - 1) // bs  # [N] blocks per sequence
        lo = first_pos // bs - (opts.local - 1)  # [nq]
        hi = last_pos // bs  # [N, nq]

        def candidate(m: torch.Tensor, rows: slice) -> torch.Tensor:  # m: [..., C] -> [N, R, C]
            ok = m < k_blocks.view(-1, 1, 1)
            if view.causal:
                ok = ok & (m * bs <= last_pos[:, rows].unsqueeze(-1))
            return ok

        def forced(m: torch.Tensor, rows: slice) -> torch.Tensor:  # [N, R, C]
            f = m < opts.sinks
            if opts.local > 0:
                f = f | ((m >= lo[rows].view(1, -1, 1)) & (m <= hi[:, rows].unsqueeze(-1)))
            return f

        def score(rows: slice, cols: slice) -> torch.Tensor:  # [N, Hq, R, C], forced blocks excluded
            s = torch.matmul(qm[..., rows, :], km[..., cols])  # [N, Hkv, G, R, C]
            m = torch.arange(cols.start, cols.stop, device=dev).view(1, 1, -1)
            drop = ~candidate(m, rows) | forced(m, rows)
            return s.masked_fill(drop.view(N, 1, 1, *drop.shape[1:]), float("-inf")).reshape(N, Hq, *s.shape[-2:])

        row_chunk, col_chunk = tile_sizes(nq, nk, elems_per_pair=N * Hq * 2, device=dev)
        _, top = streaming_topk(score, (N, Hq), nq, nk, opts.topk, row_chunk=row_chunk, col_chunk=col_chunk,
                                dtype=cd, device=dev, ordered=False)  # compact_rows orders by block
        # forced blocks: sinks, then the local span (at most local + 1 blocks: a misaligned query block
        # straddles two key blocks); duplicates and non-candidates become -1
        sink_ids = torch.arange(min(opts.sinks, nk), device=dev).view(1, 1, -1).expand(N, nq, -1)
        span = opts.local + 1 if opts.local > 0 else 0
        local_ids = lo.view(1, -1, 1) + torch.arange(span, device=dev).view(1, 1, -1)  # [1, nq, span]
        local_ids = local_ids.expand(N, -1, -1)
        keep_local = (local_ids >= opts.sinks) & (local_ids <= hi.unsqueeze(-1)) & (local_ids >= 0)
        ids = torch.cat([sink_ids, torch.where(keep_local, local_ids, torch.full_like(local_ids, -1))], -1)
        ids = torch.where((ids >= 0) & candidate(ids, slice(0, nq)), ids, torch.full_like(ids, -1))  # [N, nq, F]
        ids = ids.unsqueeze(1).expand(N, Hq, -1, -1)
        rows = torch.cat([ids, top.to(torch.int64)], -1)
    return KVSelection(compact_rows(rows, nk), q_block=bs, k_block=bs)


def select(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int, sinks: int = 1, local: int = 1,
           causal: bool = True, cu_seqlens: Optional[torch.Tensor] = None) -> KVSelection:
    """Block top-k selection for `q: [B, Tq, Hq, D]`, `k: [B, Tk, Hkv, D]`: per query head and query
    block, the `topk` key blocks with the best pooled score plus `sinks` leading and `local` diagonal blocks.

    Returns `KVSelection(indices int32 [B (N under varlen), Hq, ceil(Tq / block_size), S], block_size, block_size)`."""
    return SPEC.selection(q, k, causal=causal, cu_seqlens=cu_seqlens, block_size=block_size, topk=topk, sinks=sinks,
                          local=local)


def _example(call: AttentionCall) -> dict[str, Any]:
    return {"block_size": max(1, min(64, call.tk // 8)), "topk": 2, "sinks": 1, "local": 1}


SPEC = register_selection("block_topk", BlockTopkOptions, policy, family="prefill", example=_example,
                          flex_block=lambda opts: opts.block_size,
                          paper="MInference / FlexPrefill-style block sparse; DHSA",
                          summary="per query block and head, top-k key blocks by pooled q . pooled k, plus sink and "
                                  "local blocks")
