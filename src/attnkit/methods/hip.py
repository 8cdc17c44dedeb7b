"""`hip`: HiP Attention's hierarchical top-k pruning, training-free sparse prefill.

Per query head and query block (`block_size` queries), over the key blocks it may see
(`[0, V)`: causal, those whose first key is visible to the block's last query):

1. cut `[0, V)` into `2 * topk` ranges of blocks (boundaries `floor(i * V / (2 topk))`);
2. score every non-empty range by its representative key, the middle existing token of the range
   (`t = (first + last) // 2`), as `max over the block's queries of q . k_t * scale`;
3. keep the `topk` best ranges, split each in two (the left half takes the extra block), score the
   halves, keep the `topk` best, and repeat until every kept range is one key block.

The `topk` blocks found, plus the first `sinks` blocks and the `local` diagonal blocks (the
block's own positions and the `local - 1` blocks before), are attended; the causal rule applies
token by token. Fixed here where the paper leaves a choice: ranges are counted in key blocks of
`block_size` (HiP's search descends to single tokens or small key blocks), a range's score is the
max over the query block, and the search covers the forced blocks too (so a row holds at most
`topk + sinks + local + 1` blocks). A decode step (`Tq == 1`) attends densely.

Selection: `KVSelection(indices [B (N under varlen), Hq, ceil(Tq / block_size), S], block_size, block_size)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.contract import AttentionCall, validate_attention
from ..core.selection import KVSelection, cdiv
from ..core.checks import check_int
from ..registry import Capabilities, MethodOptions, register_selection
from ._prefill_estimate import bitmap_rows, block_span, dense_selection, query_lengths, row_chunks
from .gemm import compute_dtype
from .router import SeqView, seq_view


@dataclass(frozen=True)
class HipOptions(MethodOptions):
    block_size: int = 64
    topk: int = 32  # key blocks found by the search
    sinks: int = 1  # leading key blocks always kept
    local: int = 1  # diagonal key blocks (and those before) always kept

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size, 1)
        check_int("topk", self.topk, 1)
        check_int("sinks", self.sinks, 0)
        check_int("local", self.local, 0)


def search_levels(num_blocks: int, topk: int) -> int:
    """Halvings needed until the longest first-level range (`ceil(nk / 2 topk)` blocks) is one block."""
    longest = cdiv(num_blocks, 2 * topk)
    return max(0, math.ceil(math.log2(longest))) if longest > 1 else 0


class _Scorer:
    """Scores ranges of key blocks for a chunk of query blocks by their representative keys."""

    def __init__(self, view: SeqView, rows: slice, bs: int, scale: float) -> None:
        N, Tq, Hq, D = view.q.shape
        self.view, self.bs, self.scale = view, bs, scale
        cd = compute_dtype(view.q.dtype)
        R = rows.stop - rows.start
        chunk = view.q[:, rows.start * bs : rows.stop * bs]
        q = torch.nn.functional.pad(chunk, (0, 0, 0, 0, 0, R * bs - chunk.shape[1]))
        self.q = q.view(N, R, bs, Hq, D).permute(0, 3, 1, 2, 4).to(cd)  # [N, Hq, R, bs, D]
        i = torch.arange(rows.start * bs, rows.stop * bs, device=q.device).view(R, bs)
        self.row_ok = i.unsqueeze(0) < query_lengths(view).view(-1, 1, 1)  # [N, R, bs]
        self.group = Hq // view.k.shape[2]

    def __call__(self, s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """`s, e [N, Hq, R, W]` block ranges `[s, e)` -> scores `[N, Hq, R, W]` (-inf when empty)."""
        view, bs = self.view, self.bs
        N, Hq, R, W = s.shape
        last_tok = torch.minimum(e * bs, view.k_len.view(-1, 1, 1, 1)) - 1
        t = torch.div(s * bs + last_tok, 2, rounding_mode="floor").clamp(0, view.tk - 1)  # [N, Hq, R, W]
        kh = torch.arange(Hq, device=s.device) // self.group
        D = view.k.shape[-1]
        keys = view.k[torch.arange(N, device=s.device).view(N, 1, 1, 1), t, kh.view(1, Hq, 1, 1)]  # [N, Hq, R, W, D]
        dots = torch.matmul(self.q, keys.to(self.q.dtype).transpose(-1, -2)) * self.scale  # [N, Hq, R, bs, W]
        dots = dots.masked_fill(~self.row_ok.view(N, 1, R, bs, 1), float("-inf"))
        score = dots.amax(3)
        return score.masked_fill(e <= s, float("-inf"))


def policy(call: AttentionCall, opts: HipOptions) -> KVSelection:
    """The HiP selection of a validated call (no gradients)."""
    view = seq_view(call)
    bs, k = opts.block_size, opts.topk
    if view.tq == 1:
        return dense_selection(view, bs)
    N, Tq, Hq, _ = view.q.shape
    nq, nk = cdiv(Tq, bs), cdiv(view.tk, bs)
    dev = view.q.device
    levels = search_levels(nk, k)
    width = k + opts.sinks + (opts.local + 1 if opts.local else 0)
    with torch.no_grad():
        first, last = block_span(view, bs)
        k_blocks = (view.k_len + bs - 1) // bs  # [N]
        out = torch.empty(N, Hq, nq, max(1, min(width, nk)), dtype=torch.int32, device=dev)
        i2k = torch.arange(2 * k + 1, device=dev)
        m = torch.arange(nk, device=dev)
        for rows in row_chunks(nq, N * Hq * bs * 2 * k * 4, dev):
            R = rows.stop - rows.start
            la = last[:, rows]  # [N, R]
            V = k_blocks.view(-1, 1).expand(N, R)
            if view.causal:
                V = torch.minimum(V, la // bs + 1)
            bounds = torch.div(i2k.view(1, 1, -1) * V.unsqueeze(-1), 2 * k, rounding_mode="floor")  # [N, R, 2k+1]
            s = bounds[..., :-1].unsqueeze(1).expand(N, Hq, R, 2 * k)
            e = bounds[..., 1:].unsqueeze(1).expand(N, Hq, R, 2 * k)
            scorer = _Scorer(view, rows, bs, call.scale)
            score = scorer(s, e)
            for _ in range(levels):
                top = score.topk(k, dim=-1).indices
                s, e, score = s.gather(-1, top), e.gather(-1, top), score.gather(-1, top)
                kept = torch.isfinite(score)
                mid = s + torch.div(e - s + 1, 2, rounding_mode="floor")
                s = torch.cat([s, mid], -1)
                e = torch.cat([mid, e], -1)
                e = torch.where(torch.cat([kept, kept], -1), e, s)  # dropped (empty) ranges stay empty
                score = scorer(s, e)
            top = score.topk(min(k, score.shape[-1]), dim=-1).indices
            s, found = s.gather(-1, top), torch.isfinite(score.gather(-1, top))
            vis = torch.zeros(N, Hq, R, nk + 1, dtype=torch.bool, device=dev)
            vis.scatter_(-1, torch.where(found, s, torch.full_like(s, nk)), True)
            vis = vis[..., :nk]
            f = first[:, rows].unsqueeze(-1)  # [N, R, 1]
            forced = m.view(1, 1, -1) < opts.sinks
            if opts.local:
                forced = forced | ((m >= f // bs - (opts.local - 1)) & (m <= la.unsqueeze(-1) // bs))
            forced = forced & (m.view(1, 1, -1) < V.unsqueeze(-1))
            out[:, :, rows] = bitmap_rows(vis | forced.unsqueeze(1), width)
    return KVSelection(out, q_block=bs, k_block=bs)


def select(q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, scale: Optional[float] = None,
           cu_seqlens: Optional[torch.Tensor] = None, block_size: int = 64, topk: int = 32, sinks: int = 1, local: int = 1) -> KVSelection:
    """HiP selection for `q: [B, Tq, Hq, D]`, `k: [B, Tk, Hkv, D]`.

    Returns `KVSelection(indices int32 [B (N under varlen), Hq, ceil(Tq / block_size), S], block_size, block_size)`."""
    call = validate_attention(q, k, k, causal=causal, scale=scale, cu_seqlens=cu_seqlens)
    opts = HipOptions(block_size, topk, sinks, local)
    opts.check_call(call)
    return policy(call, opts)


def _example(call: AttentionCall) -> dict[str, Any]:
    return {"block_size": max(1, min(64, call.tk // 8)), "topk": 2, "sinks": 1, "local": 1}


SPEC = register_selection(
    "hip",
    HipOptions,
    policy,
    family="prefill",
    paper="HiP Attention (Lee et al., 2024)",
    summary="per query block, top-k key blocks found by halving ranges scored by their middle key",
    example=_example,
    flex_block=lambda opts: opts.block_size,
    capabilities=Capabilities(decode_dense=True),
)
