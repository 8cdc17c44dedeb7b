"""Triton kernels of Quest's selection: the upper bound of `q . k` over each page of a paged cache,
and the top pages of each cache row.

Imported lazily by `kv.sparse.Quest` (never by `import attnkit`). The bound of one query row over a
page with element-wise key bounds `lo, hi` is `sum_d max(q_d lo_d, q_d hi_d)`. One program owns one
cache row (a KV head of one sequence) and `BLOCK_P` (autotuned) of its logical pages: it reads the page table,
gathers the bounds of those pages straight from the pool (no `[B, Hkv, pages, D]` copy), scores
them against every query row of the group (all query heads of the KV head, all decode queries,
read straight from `q: [B, Tq, Hq, D]`) and keeps the maximum, so the bounds are read once per KV
head. The bounds are stored in the key dtype (the min and max of bf16 keys are bf16 values), so a
decode step reads `2 / page_size` of the key bytes for them.

With few query rows (decode: `G * Tq <= ROWWISE_MAX`) the bound is summed term by term, row by
row: a `tl.dot` would pad the rows to 16 and run in fp32 without tensor cores (`ieee`), four times
the work of four rows. With more rows it is two matmuls, `relu(q) . hi + min(q, 0) . lo`.

Unallocated pages and pages without a valid key score `-inf`; with `force`, the page(s) holding
the tokens being decoded score `+inf`, so they are always read (as Quest's own kernels read the
last page: its bound over a few keys is tight while full pages' bounds are loose, so by bound alone
it would lose).

`quest_top_pages` then takes each row's `k` best pages with the radix select
(`selection/radix_topk.py`: no sort, no host sync, fixed shapes, so a decode step can be captured
in a CUDA graph); ties at the k-th bound go to the smaller page, and `-inf` pages are never listed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import config
from .. import launch_env
from ..jit import max_combine, pow2, sum_combine
from .radix_topk import radix_topk

ROWWISE_MAX = 8  # query rows per KV head up to which the bound is summed row by row (no tl.dot)
# pages per program and warps by measurement; one config under the interpreter (it cannot time)
_CONFIGS = [triton.Config({"BLOCK_P": 16}, num_warps=4)] if config.triton_interpret() else \
    [triton.Config({"BLOCK_P": p}, num_warps=w) for p in (32, 64, 128) for w in (4, 8)]


@triton.autotune(configs=_CONFIGS, key=["D", "BLOCK_M", "ROWWISE", "FORCE"])
@triton.jit
def _quest_bound_kernel(Q, Seen, Lo, Hi, PT, PMax, Out,
                        stride_qb, stride_qt, stride_qh, n_heads_kv, G, Tq, maxp,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                        ROWWISE: tl.constexpr, FORCE: tl.constexpr):
    row = tl.program_id(0)  # b * Hkv + h
    b = row // n_heads_kv
    h = row % n_heads_kv
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_in = p < maxp
    page = tl.load(PT + row.to(tl.int64) * maxp + p, mask=p_in, other=-1).to(tl.int64)
    ok = page >= 0
    d = tl.arange(0, BLOCK_D)
    d_in = d < D
    # a page whose slots are all free has lo = +inf in every channel
    lo0 = tl.load(Lo + page * D, mask=ok, other=0.0).to(tl.float32)
    ok = ok & (lo0 != float("inf"))
    lo = tl.load(Lo + page[:, None] * D + d[None, :], mask=ok[:, None] & d_in[None, :], other=0.0).to(tl.float32)
    hi = tl.load(Hi + page[:, None] * D + d[None, :], mask=ok[:, None] & d_in[None, :], other=0.0).to(tl.float32)
    q_row = Q + b.to(tl.int64) * stride_qb + (h * G).to(tl.int64) * stride_qh
    if ROWWISE:
        best = tl.full([BLOCK_P], float("-inf"), tl.float32)
        for m in range(G * Tq):
            qm = tl.load(q_row + (m // Tq).to(tl.int64) * stride_qh + (m % Tq).to(tl.int64) * stride_qt + d,
                         mask=d_in, other=0.0).to(tl.float32)
            s = tl.reduce(tl.maximum(qm[None, :] * lo, qm[None, :] * hi), 1, sum_combine)  # [BLOCK_P]
            best = tl.maximum(best, s)
    else:
        m = tl.arange(0, BLOCK_M)
        m_in = m < G * Tq
        q = tl.load(q_row + ((m // Tq).to(tl.int64) * stride_qh + (m % Tq).to(tl.int64) * stride_qt)[:, None]
                    + d[None, :], mask=m_in[:, None] & d_in[None, :], other=0.0).to(tl.float32)
        s = tl.dot(tl.maximum(q, 0.0), tl.trans(hi), input_precision="ieee") \
            + tl.dot(tl.minimum(q, 0.0), tl.trans(lo), input_precision="ieee")  # [BLOCK_M, BLOCK_P]
        s = tl.where(m_in[:, None], s, float("-inf"))
        best = tl.reduce(s, 0, max_combine)
    if FORCE:  # pages holding a token at or after the first decode query's position are always read
        newest = tl.load(PMax + page, mask=ok, other=-1)
        first = tl.load(Seen + b).to(tl.int64) - Tq
        best = tl.where(newest >= first, float("inf"), best)
    best = tl.where(ok, best, float("-inf"))
    tl.store(Out + row.to(tl.int64) * maxp + p, best, mask=p_in)


def quest_page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, page_table: torch.Tensor,
                      page_newest: torch.Tensor, seen: torch.Tensor, force: bool) -> torch.Tensor:
    """`q [B, Tq, Hq, D]` (fp32/bf16/fp16, any strides with unit last stride), `kmin/kmax [P, D]`
    (the pool's page bounds), `page_table [B * Hkv, maxp]` (-1 = unallocated), `page_newest [P]`,
    `seen [B]` (tokens seen per sequence) -> `[B * Hkv, maxp]` float32: the bound, max over the
    query rows of each KV head; with `force`, `+inf` for a page holding a position `>= seen - Tq`;
    `-inf` for unallocated or empty pages."""
    B, Tq, Hq, D = q.shape
    R, maxp = page_table.shape
    H = R // B
    G = Hq // H
    out = torch.empty(R, maxp, dtype=torch.float32, device=q.device)
    if R == 0 or maxp == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    with launch_env():
        _quest_bound_kernel[lambda meta: (R, triton.cdiv(maxp, meta["BLOCK_P"]))](
            q, seen.contiguous(), kmin.contiguous(), kmax.contiguous(), page_table.contiguous(),
            page_newest.contiguous(), out, q.stride(0), q.stride(1), q.stride(2), H, G, Tq, maxp,
            D=D, BLOCK_M=pow2(G * Tq, 16), BLOCK_D=pow2(D, 16), ROWWISE=G * Tq <= ROWWISE_MAX, FORCE=force,
        )  # BLOCK_P, num_warps: autotuned
    return out


def quest_top_pages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """`scores [R, maxp]` float32 -> int32 `[R, min(k, maxp)]`: each row's `k` best pages (ascending,
    ties at the k-th score to the smaller page), `-1` where fewer than `k` pages score above `-inf`."""
    R, maxp = scores.shape
    idx = radix_topk(scores, torch.full((R,), maxp, dtype=torch.int32, device=scores.device), k)
    # a row with fewer than k pages above -inf is topped up with -inf pages: those are not read
    got = scores.gather(1, idx.clamp_min(0).long())
    return torch.where((idx < 0) | torch.isneginf(got), -1, idx)
