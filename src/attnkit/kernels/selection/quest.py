"""Triton kernel of Quest's page scores: the upper bound of `q . k` over each page of a paged cache.

Imported lazily by `kv.sparse.Quest` (never by `import attnkit`). The bound of one query row over a
page with element-wise key bounds `lo, hi` is `sum_d max(q_d lo_d, q_d hi_d)`, which equals
`relu(q) . hi + min(q, 0) . lo`: two small matmuls. One program owns one cache row (a KV head of one
sequence) and `BLOCK_P` of its logical pages: it reads the page table, gathers the bounds of those
pages straight from the pool (no `[B, Hkv, pages, D]` copy, which made the PyTorch form read and
write the bounds three times), scores them against every query row of the group and keeps the
maximum. A decode step reads the bounds once, 1/8 of the key bytes with page 16 in float32.
Unallocated pages and pages without a valid key score `-inf`; the page(s) holding the tokens being
decoded score `+inf`, so they are always read (as Quest's own kernels read the last page: its bound
over a few keys is tight while full pages' bounds are loose, so by bound alone it would lose).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..jit import max_combine


@triton.jit
def _quest_bound_kernel(Q, Lo, Hi, PT, PMax, Thr, Out, maxp, GT,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_in = p < maxp
    page = tl.load(PT + row.to(tl.int64) * maxp + p, mask=p_in, other=-1).to(tl.int64)
    ok = page >= 0
    d = tl.arange(0, BLOCK_D)
    d_in = d < D
    # a page whose slots are all free has lo = +inf in every channel
    lo0 = tl.load(Lo + page * D, mask=ok, other=0.0)
    ok = ok & (lo0 != float("inf"))
    lo = tl.load(Lo + page[:, None] * D + d[None, :], mask=ok[:, None] & d_in[None, :], other=0.0)
    hi = tl.load(Hi + page[:, None] * D + d[None, :], mask=ok[:, None] & d_in[None, :], other=0.0)
    m = tl.arange(0, BLOCK_M)
    m_in = m < GT
    q = tl.load(Q + (row.to(tl.int64) * GT + m[:, None]) * D + d[None, :], mask=m_in[:, None] & d_in[None, :],
                other=0.0)
    s = tl.dot(tl.maximum(q, 0.0), tl.trans(hi), input_precision="ieee") \
        + tl.dot(tl.minimum(q, 0.0), tl.trans(lo), input_precision="ieee")  # [BLOCK_M, BLOCK_P]
    s = tl.where(m_in[:, None], s, float("-inf"))
    best = tl.reduce(s, 0, max_combine)
    # pages holding a token at or after the first decode query's position are always read
    newest = tl.load(PMax + page, mask=ok, other=-1)
    thr = tl.load(Thr + row)
    best = tl.where(newest >= thr, float("inf"), best)
    best = tl.where(ok, best, float("-inf"))
    tl.store(Out + row.to(tl.int64) * maxp + p, best, mask=p_in)


def quest_page_scores(qg: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, page_table: torch.Tensor,
                      page_newest: torch.Tensor, first_query_pos: torch.Tensor) -> torch.Tensor:
    """`qg [R, GT, D]` float32 (the query rows of each cache row), `kmin/kmax [P, D]` float32,
    `page_table [R, maxp]` (-1 = unallocated), `page_newest [P]` int64, `first_query_pos [R]` int64
    -> `[R, maxp]` float32: the bound, max over the rows; `+inf` for a page holding a position
    `>= first_query_pos` (always read), `-inf` for unallocated or empty pages."""
    R, GT, D = qg.shape
    maxp = page_table.shape[1]
    out = torch.empty(R, maxp, dtype=torch.float32, device=qg.device)
    if R == 0 or maxp == 0:
        return out
    BLOCK_P = 64
    _quest_bound_kernel[(R, triton.cdiv(maxp, BLOCK_P))](
        qg.contiguous(), kmin.contiguous(), kmax.contiguous(), page_table.contiguous(), page_newest.contiguous(),
        first_query_pos.to(torch.int64).contiguous(), out, maxp, GT,
        D=D, BLOCK_M=max(16, triton.next_power_of_2(GT)), BLOCK_P=BLOCK_P,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
    )
    return out
