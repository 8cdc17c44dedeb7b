"""`power`: PowerAttention (Chen et al. 2025, "Exponentially Scaling of Receptive Fields").

Block-level static pattern: with blocks of `block_size` keys, a query in key block n sees key
block m iff `m == n`, `n - m` is a power of two (1, 2, 4, ...), or `m < sinks`. Each block sees
O(log(T / block_size)) blocks, and stacking d layers gives a receptive field of 2^d blocks with
no gaps. Causality still applies token by token inside the own block. Without causality attnkit
makes the pattern symmetric (`|n - m|` a power of two): our choice, the paper is causal.

Selection: `q_block = block_size` when queries align with key blocks (always when Tq == Tk, or
`(Tk - Tq) % block_size == 0`), else per token (`q_block = 1`); `k_block = block_size`; shared by
all heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.checks import check_int
from ..core.contract import AttentionCall
from ..core.selection import KVSelection, cdiv
from ..registry import MethodOptions, register_selection
from .router import compact_rows, seq_view


@dataclass(frozen=True)
class PowerOptions(MethodOptions):
    block_size: int
    sinks: int = 0  # leading key blocks every query block sees

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size, 1)
        check_int("sinks", self.sinks, 0)


def policy(call: AttentionCall, opts: PowerOptions) -> KVSelection:
    """The PowerAttention selection of a validated call."""
    view = seq_view(call)
    bs = opts.block_size
    dev = view.q.device
    nk = cdiv(view.tk, bs)
    q_block = bs if view.offset % bs == 0 else 1
    rows = cdiv(view.tq, q_block)
    own = (torch.arange(rows, device=dev) * q_block + view.offset) // bs  # key block of each row [rows]
    # 1, 2, 4, ... up to the longest distance: nk - 1, or more when Tq > Tk puts the first query
    # blocks before key 0 (aligned positions are negative there)
    reach = nk - 1 - min(0, view.offset // bs)
    steps = 1 << torch.arange(max(1, reach.bit_length()), device=dev)
    offsets = -steps if call.causal else torch.cat([-steps, steps])
    ids = torch.cat([own.view(-1, 1), own.view(-1, 1) + offsets.view(1, -1)], -1)  # [rows, P]
    k_blocks = ((view.k_len + bs - 1) // bs).view(-1, 1, 1)  # [N, 1, 1]
    ids = ids.unsqueeze(0)
    ids = torch.where((ids >= opts.sinks) & (ids < k_blocks), ids, torch.full_like(ids, -1))  # [N, rows, P]
    sinks = torch.arange(min(opts.sinks, nk), device=dev).view(1, 1, -1)
    sinks = torch.where(sinks < k_blocks, sinks, torch.full_like(sinks, -1)).expand(ids.shape[0], rows, -1)
    idx = torch.cat([sinks, ids], -1).unsqueeze(1)  # [N, 1, rows, S]
    return KVSelection(compact_rows(idx, nk), q_block=q_block, k_block=bs)


def select(q: torch.Tensor, k: torch.Tensor, *, block_size: int, sinks: int = 0, causal: bool = True,
           cu_seqlens: Optional[torch.Tensor] = None) -> KVSelection:
    """PowerAttention's block pattern for the shapes of `q: [B, Tq, Hq, D]`, `k: [B, Tk, Hkv, D]`.

    Returns `KVSelection(indices int32 [B (N under varlen), 1, Nq, S], q_block, block_size)`."""
    return SPEC.selection(q, k, causal=causal, cu_seqlens=cu_seqlens, block_size=block_size, sinks=sinks)


def _example(call: AttentionCall) -> dict[str, Any]:
    return {"block_size": max(1, min(64, call.tk // 16)), "sinks": 1}


SPEC = register_selection("power", PowerOptions, policy, family="static", example=_example, tier=2,
                          paper="PowerAttention: Exponentially Scaling of Receptive Fields for Effective Sparse "
                                "Attention",
                          summary="query block n sees key blocks n, n - 2^j and the first `sinks` blocks")
