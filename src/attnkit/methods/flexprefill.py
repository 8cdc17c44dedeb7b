"""`flexprefill`: FlexPrefill's per-head choice between a query-aware block pattern and vertical-slash.

Per query head, from the last query block `Q^` (the last `block_size` queries of each sequence):
- `a_true`: their causal softmax attention, averaged over the queries and summed per key block;
- `a_est`: the softmax, over the key blocks the block may see, of `mean(Q^) . mean(K_m) * scale`.
If `sqrt(JSD(a_true, a_est)) < tau` (Jensen-Shannon divergence, natural log) the pooled estimate is
trusted and the head takes the **query-aware** pattern: per query block n, the softmax over its
candidate key blocks of `mean(Q_n) . mean(K_m) * scale`, and the fewest blocks reaching `gamma` of
it. Otherwise the head takes **vertical-slash**: the attention of `Q^` summed per key column and
per diagonal, the fewest columns and the fewest diagonals each reaching `gamma` of its total,
run as the key blocks they touch (see `vertical_slash`).

Fixed here where the paper leaves a choice: both patterns always keep the first key block and the
diagonal blocks (the block's own positions), and in the query-aware pattern their mass counts
toward `gamma`. The causal rule applies token by token. A decode step (`Tq == 1`) attends densely.

Selection: `KVSelection(indices [B (N under varlen), Hq, ceil(Tq / block_size), S], block_size, block_size)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.contract import AttentionCall, OptionError, validate_attention
from ..core.selection import KVSelection, cdiv
from ..core.checks import check_int
from ..registry import Capabilities, MethodOptions, register_selection
from ._prefill_estimate import (bitmap_rows, block_span, block_candidates, coverage_keep, dense_selection,
                                last_query_probs, query_lengths, row_chunks, slash_sums, vertical_slash_table)
from .router import SeqView, block_mean, seq_view


def _check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise OptionError(f"{name}: expected a float in (0, 1], got {value!r}")


@dataclass(frozen=True)
class FlexPrefillOptions(MethodOptions):
    block_size: int = 128
    gamma: float = 0.9  # fraction of the estimated attention each query block (or line set) keeps
    tau: float = 0.1  # sqrt-JSD below which a head trusts the pooled (query-aware) estimate

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size, 1)
        _check_fraction("gamma", self.gamma)
        t = self.tau
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
            raise OptionError(f"tau: expected a float in [0, 1], got {t!r}")


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`sqrt(JSD(p, q))` over the last dim (natural log; 0 log 0 = 0)."""
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor) -> torch.Tensor:
        ratio = torch.where(a > 0, a / m.clamp_min(torch.finfo(m.dtype).tiny), torch.ones_like(a))
        return (a * ratio.log()).sum(-1)

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp_min(0).sqrt()


def head_uses_query_aware(view: SeqView, probs: torch.Tensor, pos: torch.Tensor, kmean: torch.Tensor, scale: float,
                          bs: int, tau: float) -> torch.Tensor:
    """`[N, Hq]` bool: the heads whose pooled estimate is within `tau` (sqrt-JSD) of the true
    block-pooled attention of the last query block."""
    N, Hq, L, Tk = probs.shape
    nk = kmean.shape[1]
    Hkv = kmean.shape[2]
    valid_rows = (pos >= view.offset) & (pos - view.offset < query_lengths(view).view(-1, 1))  # [N, L]
    count = valid_rows.sum(-1).clamp_min(1).to(probs.dtype)  # [N]
    colp = torch.nn.functional.pad(probs.sum(2), (0, nk * bs - Tk))
    a_true = colp.view(N, Hq, nk, bs).sum(-1) / count.view(N, 1, 1)  # [N, Hq, nk]
    rows = (pos - view.offset).clamp_min(0)
    ql = view.q.gather(1, rows.view(N, L, 1, 1).expand(N, L, Hq, view.q.shape[-1])).to(probs.dtype)
    qbar = (ql * valid_rows.view(N, L, 1, 1)).sum(1) / count.view(N, 1, 1)  # [N, Hq, D]
    kb = kmean.to(probs.dtype).repeat_interleave(Hq // Hkv, dim=2)  # [N, nk, Hq, D]
    logits = torch.einsum("nhd,nmhd->nhm", qbar, kb) * scale
    m = torch.arange(nk, device=probs.device)
    cand = (m.view(1, -1) * bs <= pos[:, -1:]) & (m.view(1, -1) * bs < view.k_len.view(-1, 1))  # [N, nk]
    a_est = torch.softmax(logits.masked_fill(~cand.unsqueeze(1), float("-inf")), dim=-1)
    a_est = torch.where(cand.unsqueeze(1), a_est, torch.zeros_like(a_est))
    return js_distance(a_true, a_est) < tau


def policy(call: AttentionCall, opts: FlexPrefillOptions) -> KVSelection:
    """The FlexPrefill selection of a validated causal call (no gradients)."""
    view = seq_view(call)
    bs = opts.block_size
    if view.tq == 1:
        return dense_selection(view, bs)
    N, Tq, Hq, D = view.q.shape
    Hkv = view.k.shape[2]
    nq, nk = cdiv(Tq, bs), cdiv(view.tk, bs)
    dev = view.q.device
    with torch.no_grad():
        probs, pos = last_query_probs(view, bs, call.scale)  # [N, Hq, L, Tk]
        kmean = block_mean(view.k, bs, view.k_len)  # [N, nk, Hkv, D]
        use_qa = head_uses_query_aware(view, probs, pos, kmean, call.scale, bs, float(opts.tau))  # [N, Hq]
        # vertical-slash lines: the fewest columns / diagonals reaching gamma of the last block's attention
        j = torch.arange(view.tk, device=dev)
        reach = pos[:, -1:]
        col_ok = ((j.view(1, -1) <= reach) & (j.view(1, -1) < view.k_len.view(-1, 1))).unsqueeze(1).expand(N, Hq, -1)
        diag_ok = (j.view(1, -1) <= reach).unsqueeze(1).expand(N, Hq, -1)
        none = torch.zeros_like(col_ok)
        cols = coverage_keep(probs.sum(2), col_ok, none, float(opts.gamma))
        diags = coverage_keep(slash_sums(probs, pos), diag_ok, none, float(opts.gamma))
        del probs
        vs_bitmap = vertical_slash_table(view, cols, diags, bs, force_local=True)
        # query-aware block scores: pooled queries against pooled keys, softmax per query block
        q_len = query_lengths(view)
        qmean = block_mean(view.q, bs, q_len)  # [N, nq, Hq, D]
        kb = kmean.repeat_interleave(Hq // Hkv, dim=2)  # [N, nk, Hq, D]
        first, last = block_span(view, bs)
        out = torch.empty(N, Hq, nq, nk, dtype=torch.int32, device=dev)
        for rows in row_chunks(nq, N * Hq * nk * 8, dev):
            cand, forced = block_candidates(first[:, rows], last[:, rows], view.k_len, bs, nk)  # [N, R, nk]
            logits = torch.einsum("nrhd,nmhd->nhrm", qmean[:, rows], kb) * call.scale
            mass = torch.softmax(logits.masked_fill(~cand.unsqueeze(1), float("-inf")), dim=-1)
            mass = torch.where(cand.unsqueeze(1), mass, torch.zeros_like(mass))
            qa = coverage_keep(mass, cand.unsqueeze(1), forced.unsqueeze(1), float(opts.gamma))
            out[:, :, rows] = bitmap_rows(torch.where(use_qa.view(N, Hq, 1, 1), qa, vs_bitmap(rows)), nk)
    return KVSelection(out, q_block=bs, k_block=bs)


def select(q: torch.Tensor, k: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None, scale: Optional[float] = None,
           causal: bool = True, block_size: int = 128, gamma: float = 0.9, tau: float = 0.1) -> KVSelection:
    """FlexPrefill selection for `q: [B, Tq, Hq, D]`, `k: [B, Tk, Hkv, D]` (causal only).

    Returns `KVSelection(indices int32 [B (N under varlen), Hq, ceil(Tq / block_size), S], block_size, block_size)`."""
    call = validate_attention(q, k, k, causal=causal, scale=scale, cu_seqlens=cu_seqlens)
    if not causal:
        raise OptionError("causal: method 'flexprefill' is causal only, got causal=False")
    opts = FlexPrefillOptions(block_size, gamma, tau)
    opts.check_call(call)
    return policy(call, opts)


def _example(call: AttentionCall) -> dict[str, Any]:
    return {"block_size": max(1, min(64, call.tk // 8)), "gamma": 0.9, "tau": 0.1}


SPEC = register_selection(
    "flexprefill",
    FlexPrefillOptions,
    policy,
    family="prefill",
    paper="FlexPrefill (Lai et al., 2025)",
    summary="per head, query-aware blocks or vertical-slash lines (chosen by JS divergence), kept up to a cumulative gamma",
    example=_example,
    capabilities=Capabilities(non_causal=False, selection_reads_whole_prompt=True, decode_dense=True),
    flex_block=lambda opts: opts.block_size,
)
