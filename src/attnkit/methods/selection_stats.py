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


def _visible_counts(selection: KVSelection, tq: int, k_len: torch.Tensor, q_len: torch.Tensor, offset: int,
                    causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`(visited, causal_pairs)` float64 sums over the selection's batch, heads and queries.

    Query row i of sequence n (i < q_len[n]) sits at key position i + offset; keys are < k_len[n]."""
    idx = selection.indices.to(torch.int64)  # [N, H, Nq, S]
    N, H = idx.shape[:2]
    dev = idx.device
    kb, qb = selection.k_block, selection.q_block
    visited = torch.zeros((), dtype=torch.float64, device=dev)
    pairs = torch.zeros((), dtype=torch.float64, device=dev)
    chunk = max(1, (1 << 22) // max(1, N * H * max(1, idx.shape[-1])))
    klen = k_len.view(N, 1, 1, 1)
    for i0 in range(0, tq, chunk):
        i = torch.arange(i0, min(i0 + chunk, tq), device=dev)
        q_ok = (i.view(1, -1) < q_len.view(-1, 1)).view(N, 1, -1, 1)  # [N, 1, C, 1]
        p = (i + offset).view(1, 1, -1, 1)
        m = idx[:, :, i // qb]  # [N, H, C, S]
        end = torch.minimum((m + 1) * kb, klen)
        if causal:
            end = torch.minimum(end, p + 1)
        n_vis = (end - m * kb).clamp_min(0) * (m >= 0)
        visited += (n_vis * q_ok).sum(dtype=torch.float64)
        reach = torch.minimum(p + 1, klen) if causal else klen.expand(N, 1, p.shape[2], 1)
        pairs += (reach.clamp_min(0) * q_ok).sum(dtype=torch.float64) * H
    return visited, pairs


def density(selection: KVSelection, tq: int, tk: int, *, causal: bool = True,
            cu_seqlens: Optional[torch.Tensor] = None) -> float:
    """Fraction of the causally visible (query, key) pairs that `selection` visits, averaged over
    heads (each selection head serves the same number of query heads). `tq`, `tk` are the query and
    key lengths (ignored under varlen, where `cu_seqlens` gives the per-sequence lengths)."""
    if not isinstance(selection, KVSelection):
        raise AttnkitError(f"selection: expected an attnkit KVSelection, got {type(selection).__name__}")
    dev = selection.indices.device
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=dev, dtype=torch.int64)
        lens = cu[1:] - cu[:-1]
        longest = int(lens.max())
        selection.validate(lens.numel(), selection.num_heads, selection.num_heads, longest, longest)
        visited, pairs = _visible_counts(selection, longest, lens, lens, 0, causal)
    else:
        B = selection.indices.shape[0]
        selection.validate(B, selection.num_heads, selection.num_heads, tq, tk)
        lens_k = torch.full((B,), tk, dtype=torch.int64, device=dev)
        lens_q = torch.full((B,), tq, dtype=torch.int64, device=dev)
        visited, pairs = _visible_counts(selection, tq, lens_k, lens_q, tk - tq, causal)
    return float(visited / pairs) if float(pairs) > 0 else 0.0


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
