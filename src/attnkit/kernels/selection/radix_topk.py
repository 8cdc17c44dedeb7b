"""Triton radix select: each row's `k` largest scores (DSA's top-2048 of up to T keys) without a sort.

Why: DSA's indexer writes a tile of float32 scores per chunk of query rows; `torch.topk(2048)` over
rows of up to 64K keys then costs several times the indexer itself. A radix select needs a fixed
number of streaming passes over each row instead: the scores are mapped to order-preserving
unsigned 32-bit keys, and four histogram passes (8 bits each, from the top) find the exact key of
the row's k-th largest score and how many of the scores equal to it are still needed; a last pass
writes the indices of every larger score and of the first needed equal ones, in index order. So ties
at the threshold go to the smaller index, rows come out ascending (the `KVSelection` layout, no sort
after), and a row with fewer than k valid scores keeps all of them, -1 padded.

`-0.0` is canonicalised to `+0.0` (torch compares them equal); NaN scores are not supported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import launch_env

BLOCK = 2048  # scores per step of a pass (module attribute: tests shrink it)
NUM_WARPS = 8
BITS = 8  # bits per histogram pass (4 passes over a 32-bit key)


@triton.jit
def _ukey(x):
    """float32 -> uint32 whose unsigned order is the floats' order (-0.0 taken as +0.0)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed order = float order
    return key.to(tl.uint32, bitcast=True) ^ 0x80000000


@triton.jit
def _radix_topk_kernel(S, LEN, OUT, stride_sr, stride_or, k, BLOCK: tl.constexpr, BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    L = tl.load(LEN + row)
    base = S + row * stride_sr
    out = OUT + row * stride_or
    offs = tl.arange(0, BLOCK)
    NB: tl.constexpr = 1 << BITS
    bins = tl.arange(0, NB)
    half = tl.reshape(tl.arange(0, 2), (2, 1))
    if L <= k:  # every valid score is kept
        for c0 in range(0, L, BLOCK):
            idx = c0 + offs
            tl.store(out + idx, idx.to(tl.int32), mask=idx < L)
    else:
        need = k
        prefix = tl.full((), 0, tl.uint32)
        pmask = tl.full((), 0, tl.uint32)
        for p in tl.static_range(32 // BITS):
            hist = tl.full((NB,), 0, tl.int32)
            for c0 in range(0, L, BLOCK):
                idx = c0 + offs
                m = idx < L
                u = _ukey(tl.load(base + idx, mask=m, other=0.0))
                match = m & ((u & pmask) == prefix)
                digit = ((u >> (32 - BITS * (p + 1))) & (NB - 1)).to(tl.int32)
                slot = tl.where(match, NB - 1 - digit, NB)  # largest digit first; NB..: not counted
                h2 = tl.reshape(tl.histogram(slot, 2 * NB), (2, NB))
                hist += tl.sum(tl.where(half == 0, h2, 0), axis=0)
            cum = tl.cumsum(hist, 0)
            b = tl.sum((cum < need).to(tl.int32), 0)  # the bin holding the need-th largest
            need -= tl.sum(tl.where(bins < b, hist, 0), 0)
            prefix = prefix | ((NB - 1 - b).to(tl.uint32) << (32 - BITS * (p + 1)))
            pmask = pmask | (tl.full((), NB - 1, tl.uint32) << (32 - BITS * (p + 1)))
        taken = 0
        eq_seen = 0
        for c0 in range(0, L, BLOCK):
            idx = c0 + offs
            m = idx < L
            u = _ukey(tl.load(base + idx, mask=m, other=0.0))
            gt = m & (u > prefix)
            eq = m & (u == prefix)
            eq_rank = eq_seen + tl.cumsum(eq.to(tl.int32), 0) - 1
            sel = gt | (eq & (eq_rank < need))
            pos = taken + tl.cumsum(sel.to(tl.int32), 0) - 1
            tl.store(out + pos, idx.to(tl.int32), mask=sel)
            taken += tl.sum(sel.to(tl.int32), 0)
            eq_seen += tl.sum(eq.to(tl.int32), 0)


def radix_topk(scores: torch.Tensor, lengths: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of `scores [R, C]` (float32), the indices of its `k` largest among the first
    `lengths[r]` columns: int32 `[R, min(k, C)]`, ascending, -1 padded; ties at the k-th value go to
    the smaller index."""
    R, C = scores.shape
    width = min(k, C)
    out = torch.full((R, width), -1, dtype=torch.int32, device=scores.device)
    if out.numel() == 0:
        return out
    if scores.dtype != torch.float32:
        raise ValueError(f"scores: the radix select takes float32, got {scores.dtype}")
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    lengths = lengths.to(device=scores.device, dtype=torch.int32).clamp(0, C).contiguous()
    with launch_env():
        _radix_topk_kernel[(R,)](scores, lengths, out, scores.stride(0), out.stride(0), width,
                                 BLOCK=BLOCK, BITS=BITS, num_warps=NUM_WARPS)
    return out
