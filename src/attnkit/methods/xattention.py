"""`xattention`: XAttention's antidiagonal block scoring with threshold selection, training-free prefill.

Queries and keys are cut into blocks of `block_size` and, inside, into groups of `stride` (S).
Strided query r (rows rS..rS+S-1) and strided key c score the antidiagonal through their S x S
tile: `sum_s q[rS + S-1-s] . k[cS + s]`, scaled by `scale / S` (the mean logit along the
antidiagonal, as the paper's code divides by the stride). Each strided query row is softmax-
normalised over the strided keys it may see (causal: `cS <= last position of r`; keys past the
end are zero-padded, groups wholly past it dropped). Block score (n, m) is the sum of those
probabilities over the strided rows of query block n and the strided keys of key block m.

Per query block: the first key block and the diagonal blocks (holding the block's own positions)
are kept first and their score counts; then key blocks by descending score while the kept score
is below `threshold` times the row's total. The causal rule applies token by token. A decode step
(`Tq == 1`) attends densely.

Selection: `KVSelection(indices [B (N under varlen), Hq, ceil(Tq / block_size), S'], block_size, block_size)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.contract import AttentionCall, OptionError, validate_attention
from ..core.selection import KVSelection, cdiv
from ..core.checks import check_int
from ..registry import Capabilities, MethodOptions, register_selection
from ._prefill_estimate import bitmap_rows, block_candidates, block_span, coverage_keep, dense_selection, query_lengths, row_chunks
from .gemm import bmm_f32
from .router import SeqView, seq_view


@dataclass(frozen=True)
class XAttentionOptions(MethodOptions):
    block_size: int = 128
    stride: int = 8  # S: antidiagonal spacing inside a block
    threshold: float = 0.9  # fraction of each query block's score to keep

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size, 1)
        check_int("stride", self.stride, 1)
        if self.block_size % self.stride:
            raise OptionError(f"stride: expected a divisor of block_size ({self.block_size}), got {self.stride}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise OptionError(f"threshold: expected a float in (0, 1], got {t!r}")


def _strided(x: torch.Tensor, total: int, stride: int, reverse: bool) -> torch.Tensor:
    """`[N, T, H, D]` zero-padded to `total` rows -> `[N, H, total / S, S * D]`: each group of S rows
    concatenated (in reverse order for queries, so the product runs along the antidiagonal)."""
    N, T, H, D = x.shape
    x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, total - T)).view(N, total // stride, stride, H, D)
    if reverse:
        x = x.flip(2)
    return x.permute(0, 3, 1, 2, 4).reshape(N, H, total // stride, stride * D)


def block_scores(view: SeqView, opts: XAttentionOptions, scale: float, rows: slice, qs: torch.Tensor,
                 ks: torch.Tensor) -> torch.Tensor:
    """Antidiagonal block scores of query blocks `rows`: `[N, Hq, R, nk]` float32 (each valid strided
    query row contributes a probability distribution; padding rows contribute 0)."""
    bs, S = opts.block_size, opts.stride
    N, Hkv, Cs, SD = ks.shape
    Hq = qs.shape[1]
    G, per = Hq // Hkv, bs // S
    nk = Cs // per
    dev = qs.device
    r = torch.arange(rows.start * per, rows.stop * per, device=dev)  # strided query rows
    col_stop = Cs if not view.causal else min(Cs, (view.offset + rows.stop * bs - 1) // S + 1)
    col_stop = cdiv(col_stop, per) * per
    a = qs[:, :, rows.start * per : rows.stop * per].reshape(N, Hkv, G * r.numel(), SD)
    logits = bmm_f32(a.reshape(N * Hkv, -1, SD), ks[:, :, :col_stop].reshape(N * Hkv, col_stop, SD).transpose(1, 2))
    logits = logits.view(N, Hq, r.numel(), col_stop).mul_(scale / S)
    # Only the columns past `lo` can be invisible to some row of the chunk (the causal staircase and
    # keys past the end): mask that slice in place instead of the whole tile (memory-bound passes).
    lo = 0 if view.packing is not None else cdiv(view.tk, S)
    if view.causal:
        lo = min(lo, max(0, rows.start * per + (view.offset + S - 1) // S + 1)) if view.packing is None else 0
    lo = min(lo, col_stop)
    c = torch.arange(lo, col_stop, device=dev)
    vis = (c.view(1, 1, -1) * S < view.k_len.view(-1, 1, 1)).expand(N, r.numel(), col_stop - lo)
    if view.causal:
        vis = vis & (c.view(1, 1, -1) * S <= (view.offset + r * S + S - 1).view(1, -1, 1))
    logits[..., lo:].masked_fill_(~vis.unsqueeze(1), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    del logits
    # strided query rows past a sequence's end contribute nothing (they may also be all -inf: NaN)
    # and, when Tq > Tk, rows before the first key see nothing
    row_ok = (r * S).view(1, -1) < query_lengths(view).view(-1, 1)  # [N, Rs]
    if view.causal and view.offset < 0:
        row_ok = row_ok & (view.offset + r * S + S - 1 >= 0).view(1, -1)
    if view.packing is not None or rows.stop * bs > view.tq or (view.causal and view.offset < 0):
        probs.masked_fill_(~row_ok.view(N, 1, -1, 1), 0.0)
    R = rows.stop - rows.start
    blocks = probs.view(N, Hq, R, per, col_stop // per, per).sum((3, 5))
    return torch.nn.functional.pad(blocks, (0, nk - blocks.shape[-1]))


def policy(call: AttentionCall, opts: XAttentionOptions) -> KVSelection:
    """The XAttention selection of a validated call (no gradients)."""
    view = seq_view(call)
    bs = opts.block_size
    if view.tq == 1:
        return dense_selection(view, bs)
    N, Tq, Hq, _ = view.q.shape
    nq, nk = cdiv(Tq, bs), cdiv(view.tk, bs)
    dev = view.q.device
    with torch.no_grad():
        qs = _strided(view.q, nq * bs, opts.stride, reverse=True)  # [N, Hq, nq * bs / S, S * D]
        ks = _strided(view.k, nk * bs, opts.stride, reverse=False)  # [N, Hkv, nk * bs / S, S * D]
        first, last = block_span(view, bs)
        out = torch.empty(N, Hq, nq, nk, dtype=torch.int32, device=dev)
        per = bs // opts.stride
        for rows in row_chunks(nq, N * Hq * per * per * nk, dev):  # the strided logits of one query block
            mass = block_scores(view, opts, call.scale, rows, qs, ks)  # [N, Hq, R, nk]
            cand, forced = block_candidates(first[:, rows], last[:, rows], view.k_len, bs, nk, view.causal)
            keep = coverage_keep(mass, cand.unsqueeze(1), forced.unsqueeze(1), float(opts.threshold))
            out[:, :, rows] = bitmap_rows(keep, nk)
    return KVSelection(out, q_block=bs, k_block=bs)


def select(q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, scale: Optional[float] = None,
           cu_seqlens: Optional[torch.Tensor] = None, block_size: int = 128, stride: int = 8, threshold: float = 0.9) -> KVSelection:
    """XAttention selection for `q: [B, Tq, Hq, D]`, `k: [B, Tk, Hkv, D]`.

    Returns `KVSelection(indices int32 [B (N under varlen), Hq, ceil(Tq / block_size), S'], block_size, block_size)`."""
    call = validate_attention(q, k, k, causal=causal, scale=scale, cu_seqlens=cu_seqlens)
    opts = XAttentionOptions(block_size, stride, threshold)
    opts.check_call(call)
    return policy(call, opts)


def _example(call: AttentionCall) -> dict[str, Any]:
    bs = max(2, min(64, call.tk // 8)) // 2 * 2
    return {"block_size": bs, "stride": 2, "threshold": 0.9}


SPEC = register_selection(
    "xattention",
    XAttentionOptions,
    policy,
    family="prefill",
    paper="XAttention (Xu et al., 2025)",
    summary="block scores from strided antidiagonal sums; per query block, the fewest key blocks reaching a score threshold",
    example=_example,
    flex_block=lambda opts: opts.block_size,
    capabilities=Capabilities(decode_dense=True),
)
