"""Fidelity and work metrics, computed a query chunk at a time (never a `T x T` tensor).

- Exact reference: `core.blockwise_attention` on the same inputs upcast to float64 on CPU (float32
  on CUDA, where float64 would dominate the run), with large tiles.
- `rel_error = ||o - o_ref|| / ||o_ref||` over the whole output; `cosine` = mean over (batch, token,
  head) rows of the cosine similarity of `o` and `o_ref`; `lse_error` = mean |lse - lse_ref| over
  rows that see at least one key in both.
- Attention-mass recall of a visibility `V` (see `visibility.py`): for each query row, the share of
  its exact softmax probability that falls on keys in `V`, `sum_{j in V} p_ij / sum_j p_ij`;
  `recall` is the mean over rows (batch, head, query), `recall_min` the worst row. Computed here in
  one pass over query chunks with full key rows, for selections and mask predicates alike (about
  twice as fast as `attnkit.methods.selection_stats`'s two tiled executor runs, which covers selections
  only); the tests check it against that module and the naive oracle. A full selection gives
  exactly 1.0 (the two sums are then the same sum).
- `density`: visible pairs / causally visible pairs, over batch and heads (1.0 for dense).
- `needle_hits`: share of planted (query, needle) pairs, over batch and heads, that are visible.
- FLOPs, mask-aware: `2 * (D + Dv)` per visible (query, key) pair (the QK^T and PV products),
  i.e. the useful work; a block-granular kernel may compute more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.reference import blockwise_attention
from ..methods import selection_stats as selection_stats_module
from .visibility import Visibility

TILE_ELEMS = 1 << 23  # scores per chunk of the metric loops on CPU
TILE_ELEMS_CUDA = 1 << 26  # on CUDA: fewer, larger chunks (about 1 GiB of float32 temporaries)


def _tile_elems(device: torch.device) -> int:
    return TILE_ELEMS_CUDA if device.type == "cuda" else TILE_ELEMS


def reference_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cuda" else torch.float64


def exact_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact `(out [B, T, Hq, Dv], lse [B, Hq, T])` in the reference dtype, O(T) memory."""
    cd = reference_dtype(q.device)
    B, Tq, Hq, _ = q.shape
    Tk = k.shape[1]
    ck = min(Tk, 4096)
    cq = max(1, min(Tq, _tile_elems(q.device) // (B * Hq * ck)))
    with torch.no_grad():
        return blockwise_attention(q.to(cd), k.to(cd), v.to(cd), causal=causal, scale=scale, q_chunk=cq, k_chunk=ck)


@dataclass
class Fidelity:
    rel_error: float
    cosine: float
    lse_error: Optional[float]
    empty_rows: int  # rows where exactly one of the two sees no key


def fidelity(out: torch.Tensor, ref_out: torch.Tensor, lse: Optional[torch.Tensor] = None,
             ref_lse: Optional[torch.Tensor] = None) -> Fidelity:
    """Output error and LSE error of a method against the exact reference."""
    o, r = out.to(ref_out.dtype), ref_out
    rel = (o - r).norm().item() / max(r.norm().item(), torch.finfo(r.dtype).tiny)
    on, rn = o.norm(dim=-1), r.norm(dim=-1)
    dot = (o * r).sum(-1)
    both_zero = (on == 0) & (rn == 0)
    cos = torch.where(both_zero, torch.ones_like(dot), dot / (on * rn).clamp_min(torch.finfo(r.dtype).tiny))
    lse_err, empty = None, 0
    if lse is not None and ref_lse is not None:
        a, b = lse.to(ref_lse.dtype), ref_lse
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        empty = int((fa != fb).sum())
        both = fa & fb
        lse_err = (a[both] - b[both]).abs().mean().item() if bool(both.any()) else None
    return Fidelity(rel, cos.mean().item(), lse_err, empty)


def visible_pairs_causal(batch: int, heads: int, tq: int, tk: int, causal: bool) -> int:
    """(query, key) pairs visible under the causal rule alone (bottom-right aligned)."""
    if not causal:
        return batch * heads * tq * tk
    per_query = (torch.arange(tq, dtype=torch.int64) + (tk - tq + 1)).clamp(0, tk)
    return batch * heads * int(per_query.sum())


def attention_flops(pairs: int, head_dim: int, head_dim_v: int) -> float:
    return 2.0 * (head_dim + head_dim_v) * pairs


@dataclass
class SelectionStats:
    recall: float
    recall_min: float
    density: float
    visible_pairs: int
    needle_hits: Optional[float]
    computed_by: str = "attnkit.bench.metrics"


def _needle_hits(vis: Visibility, q: torch.Tensor, needles: Optional[torch.Tensor]) -> Optional[float]:
    if needles is None or not needles.numel():
        return None
    return vis.pairs(needles, q.device).float().mean().item()


def inspect_selection_stats(vis: Visibility, q: torch.Tensor, k: torch.Tensor, scale: float,
                            needles: Optional[torch.Tensor] = None) -> Optional[SelectionStats]:
    """The same statistics for a `KVSelection` through `attnkit.methods.selection_stats` (None for
    masks): a cross-check of `own_selection_stats`, used by the tests."""
    module = selection_stats_module
    if vis.selection is None or vis.mask is not None:
        return None
    cd = reference_dtype(q.device)
    r = module.recall(q.to(cd), k.to(cd), vis.selection, causal=vis.causal, scale=scale, reduce=False)
    dens = module.density(vis.selection, vis.tq, vis.tk, causal=vis.causal)
    reachable = visible_pairs_causal(vis.batch, vis.hq, vis.tq, vis.tk, vis.causal)
    return SelectionStats(r.mean().item(), r.min().item(), dens, round(dens * reachable),
                          _needle_hits(vis, q, needles), "attnkit.methods.selection_stats")


def selection_stats(vis: Visibility, q: torch.Tensor, k: torch.Tensor, scale: Optional[float] = None,
                    needles: Optional[torch.Tensor] = None) -> SelectionStats:
    """Attention-mass recall, density and needle hits of `vis` on inputs `q: [B, Tq, Hq, D]`, `k: [B, Tk, Hkv, D]`."""
    B, Tq, Hq, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    return own_selection_stats(vis, q, k, scale, needles)


def own_selection_stats(vis: Visibility, q: torch.Tensor, k: torch.Tensor, scale: float,
                        needles: Optional[torch.Tensor] = None) -> SelectionStats:
    """`selection_stats` in one pass over query chunks with full key rows (any visibility)."""
    cd = reference_dtype(q.device)
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    qh = q.to(cd).transpose(1, 2)  # [B, Hq, Tq, D]
    kh = k.to(cd).transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, Tk, D]
    full = Visibility("exact", B, Hq, Hkv, Tq, Tk, vis.causal)
    cq = max(1, min(Tq, _tile_elems(q.device) // (B * Hq * Tk)))
    recall_sum, recall_min, rows, visible = 0.0, math.inf, 0, 0
    with torch.no_grad():
        for start in range(0, Tq, cq):
            qs = slice(start, min(Tq, start + cq))
            s = torch.matmul(qh[:, :, qs], kh.transpose(-1, -2)).mul_(scale)  # [B, Hq, Cq, Tk]
            allowed = full.chunk(qs, q.device).expand_as(s)
            s = s.masked_fill(~allowed, -math.inf)
            m = s.amax(-1, keepdim=True)
            e = torch.exp(s - torch.where(torch.isinf(m), torch.zeros_like(m), m))
            sel_mask = vis.chunk(qs, q.device).expand_as(s)
            total = e.sum(-1)
            kept = torch.where(sel_mask, e, torch.zeros_like(e)).sum(-1)
            seen = total > 0
            r = kept[seen] / total[seen]
            recall_sum += r.sum().item()
            recall_min = min(recall_min, r.min().item()) if r.numel() else recall_min
            rows += r.numel()
            visible += int((sel_mask & allowed).sum())
    hits = _needle_hits(vis, q, needles)
    reachable = visible_pairs_causal(B, Hq, Tq, Tk, vis.causal)
    return SelectionStats(recall_sum / max(rows, 1), recall_min if rows else math.nan,
                          visible / max(reachable, 1), visible, hits)
