"""The naive attention oracle: materialises every score, by design. Tests only.

Written independently of the blockwise reference (dense boolean masks, a Python loop over varlen
sequences), so that agreement between the two means something.
"""

from __future__ import annotations

from typing import Optional

import torch

from .contract import seq_lengths
from .masks import Mask
from .selection import KVSelection


def _one(q, k, v, *, causal, scale, mask, selection, b_index, compute_dtype):
    # q: [1, Tq, Hq, D], k/v: [1, Tk, Hkv, D]
    _, tq, hq, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    qh = q.transpose(1, 2).to(compute_dtype)
    kh = k.transpose(1, 2).to(compute_dtype).repeat_interleave(hq // hkv, dim=1)
    vh = v.transpose(1, 2).to(compute_dtype).repeat_interleave(hq // hkv, dim=1)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [1, Hq, Tq, Tk]
    bb = torch.full((1, 1, 1, 1), b_index, device=q.device)  # the real batch / sequence index
    hh = torch.arange(hq, device=q.device).view(1, -1, 1, 1)
    qq = (torch.arange(tq, device=q.device) + (tk - tq)).view(1, 1, -1, 1)  # bottom-right aligned
    kk = torch.arange(tk, device=q.device).view(1, 1, 1, -1)
    vis = torch.ones(1, hq, tq, tk, dtype=torch.bool, device=q.device)
    if mask is not None:
        vis &= mask(bb, hh, qq, kk)
    if causal:
        vis &= kk <= qq
    if selection is not None:
        rows = -(-tq // selection.q_block)  # under varlen, rows past this sequence's end are padding
        sel = KVSelection(selection.indices[b_index : b_index + 1, :, :rows], selection.q_block, selection.k_block)
        vis &= sel.to_dense_mask(hq, hkv, tq, tk)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [1, Hq, Tq]
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.matmul(p, vh).transpose(1, 2)  # [1, Tq, Hq, Dv]
    return out, lse


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    mask: Optional[Mask] = None,
    selection: Optional[KVSelection] = None,
    compute_dtype: Optional[torch.dtype] = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention by materialising scores: returns `(out [B, Tq, Hq, Dv], lse [B, Hq, Tq])`
    in `compute_dtype` (float64 by default; `None` computes in the inputs' dtype, which is the
    "same-dtype PyTorch computation" of the tolerance rule). Differentiable."""
    cd = compute_dtype or q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses = [], []
    if cu_seqlens is None:
        for b in range(q.shape[0]):
            o, l = _one(q[b : b + 1], k[b : b + 1], v[b : b + 1], causal=causal, scale=scale, mask=mask,
                        selection=selection, b_index=b, compute_dtype=cd)
            outs.append(o)
            lses.append(l)
        return torch.cat(outs, 0), torch.cat(lses, 0)
    start = 0
    for n, length in enumerate(seq_lengths(cu_seqlens)):
        sl = slice(start, start + length)
        if length == 0:
            start += length
            continue
        o, l = _one(q[:, sl], k[:, sl], v[:, sl], causal=causal, scale=scale, mask=mask, selection=selection,
                    b_index=n, compute_dtype=cd)
        outs.append(o)
        lses.append(l)
        start += length
    return torch.cat(outs, 1), torch.cat(lses, 2)
