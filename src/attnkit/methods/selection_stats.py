"""Look at a selection: how much of the causal attention it visits and how much attention mass it keeps.

- `density`: visited (query, key) pairs / causally visible pairs (1.0 is dense causal attention),
  counted block by block in O(Tq * S) — never a `[Tq, Tk]` tensor.
- `recall`: the share of exact attention probability the selection covers, per query and head,
  `exp(lse_selected - lse_full)`: two LSE-only runs of the blockwise executor (values of width 1),
  so it is exact and O(T) in memory.
- `report`: both, as a dict.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ..core.contract import AttnkitError, validate_attention
from ..core.reference import blockwise_attention
from ..core.selection import KVSelection
from ..ops.sparse import validate_selection


def density(selection: KVSelection, tq: int, tk: int, *, causal: bool = True,
            cu_seqlens: Optional[torch.Tensor] = None) -> float:
    """Fraction of the causally visible (query, key) pairs that `selection` visits, averaged over
    heads (each selection head serves the same number of query heads). `tq`, `tk` are the query and
    key lengths (ignored under varlen, where `cu_seqlens` gives the per-sequence lengths)."""
    if not isinstance(selection, KVSelection):
        raise AttnkitError(f"selection: expected an attnkit KVSelection, got {type(selection).__name__}")
    return selection.density(tq, tk, causal=causal, cu_seqlens=cu_seqlens)


def recall(q: torch.Tensor, k: torch.Tensor, selection: KVSelection, *, causal: bool = True,
           scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
           reduce: bool = True) -> Union[float, torch.Tensor]:
    """Attention-mass recall: the share of exact softmax probability (over causal keys) that falls
    on the selected keys, `exp(lse_selected - lse_full)`. `q: [B, Tq, Hq, D]`, `k: [B, Tk, Hkv, D]`.

    Returns the mean over batch, heads and queries (a float), or with `reduce=False` the per-query
    recall `[B, Hq, Tq]` float32 (float64 for float64 inputs). Computed without gradients."""
    call = validate_attention(q, k, k, causal=causal, scale=scale, cu_seqlens=cu_seqlens)
    selection = validate_selection(call, selection)
    with torch.no_grad():
        q, k = q.detach(), k.detach()
        v = k.new_zeros(*k.shape[:3], 1)  # only the LSE is used
        _, lse_full = blockwise_attention(q, k, v, causal=causal, scale=call.scale, cu_seqlens=cu_seqlens)
        _, lse_sel = blockwise_attention(q, k, v, causal=causal, scale=call.scale, cu_seqlens=cu_seqlens,
                                         selection=selection)
        seen = torch.isfinite(lse_full)
        r = torch.where(seen, torch.exp(lse_sel - torch.where(seen, lse_full, torch.zeros_like(lse_full))),
                        torch.zeros_like(lse_full))
    if not reduce:
        return r
    return float(r[seen].mean()) if bool(seen.any()) else 0.0


def report(q: torch.Tensor, k: torch.Tensor, selection: KVSelection, *, causal: bool = True,
           scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """`{"density": ..., "recall": ..., "width": S, "q_block": ..., "k_block": ...}` for a selection."""
    return {
        "density": density(selection, q.shape[1], k.shape[1], causal=causal, cu_seqlens=cu_seqlens),
        "recall": recall(q, k, selection, causal=causal, scale=scale, cu_seqlens=cu_seqlens),
        "width": selection.width,
        "q_block": selection.q_block,
        "k_block": selection.k_block,
    }
