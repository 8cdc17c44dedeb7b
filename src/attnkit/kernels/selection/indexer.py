"""Triton kernel of DSA's lightning-indexer scores for one tile of query rows and key columns.

`I[n, i, j] = sum_h w[n, i, h] * relu(q_idx[n, i, h] . k_idx[n, j])`, masked to `-inf` where key j
is past the sequence's length or (causal) after query i's position `i + offset`. Imported lazily by
`methods.dsa` (never by `import attnkit`).

Why a kernel: in PyTorch the tile is a `[R * Hi, C]` float32 GEMM output, a ReLU pass over it and
a batched GEMV over the heads: Hi + 2 float32 passes over the tile's memory, which at T = 65536
(Hi = 4) is tens of GB of traffic per selection. Here each program keeps its `[BLOCK_M, BLOCK_N]`
scores in registers across the heads (one tensor-core dot per head, fp32 accumulation) and writes
the tile once. Half-precision inputs multiply exactly into float32; float32 inputs use IEEE dots,
so the scores equal the PyTorch tile's up to summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import launch_env


@triton.jit
def _indexer_scores_kernel(Q, K, W, KLEN, S, R, C, row0, col0, offset,
                           stride_qn, stride_qt, stride_qh, stride_kn, stride_kt, stride_wn, stride_wt, stride_wh,
                           stride_sn, stride_sr,
                           HI, DI: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    pid_m, pid_n, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n64 = n.to(tl.int64)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of the tile
    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    i = (row0 + r).to(tl.int64)  # query rows of the view
    j = (col0 + c).to(tl.int64)  # key columns of the view
    r_in, c_in = r < R, c < C
    out = S + n64 * stride_sn + r.to(tl.int64)[:, None] * stride_sr + c[None, :]
    klen = tl.load(KLEN + n)
    first_col = col0 + pid_n * BLOCK_N
    last_pos = row0 + pid_m * BLOCK_M + BLOCK_M - 1 + offset
    skip = first_col >= klen
    if CAUSAL:
        skip = skip | (first_col > last_pos)
    heads = tl.where(skip, 0, HI)  # a tile with nothing visible does no dot products
    d = tl.arange(0, BLOCK_D)
    d_in = d < DI
    k = tl.load(K + n64 * stride_kn + j[:, None] * stride_kt + d[None, :],
                mask=(c_in & (j < klen))[:, None] & d_in[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    kt = tl.trans(k)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)  # core builtins only (see kernels/jit.py)
    q_base = Q + n64 * stride_qn + i[:, None] * stride_qt + d[None, :]
    w_base = W + n64 * stride_wn + i * stride_wt
    for h in range(0, heads):
        q = tl.load(q_base + h * stride_qh, mask=r_in[:, None] & d_in[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        w = tl.load(w_base + h * stride_wh, mask=r_in, other=0.0).to(tl.float32)
        acc += w[:, None] * tl.maximum(s, 0.0)
    vis = (j < klen)[None, :] & r_in[:, None]
    if CAUSAL:
        vis = vis & (j[None, :] <= (i + offset)[:, None])
    acc = tl.where(vis, acc, float("-inf"))
    tl.store(out, acc, mask=r_in[:, None] & c_in[None, :])


def indexer_scores(q_idx: torch.Tensor, k_idx: torch.Tensor, w: torch.Tensor, k_len: torch.Tensor,
                   rows: slice, cols: slice, offset: int, causal: bool) -> torch.Tensor:
    """Scores of one tile: `q_idx [N, Tq, Hi, Di]`, `k_idx [N, Tk, Di]` (same dtype), `w [N, Tq, Hi]`,
    `k_len [N]` valid keys per sequence -> `[N, R, C]` float32 for `rows` x `cols` of the view
    (query row i at key position `i + offset`), `-inf` where not visible."""
    N, _, HI, DI = q_idx.shape
    R, C = rows.stop - rows.start, cols.stop - cols.start
    out = torch.empty(N, R, C, dtype=torch.float32, device=q_idx.device)
    if N == 0 or R == 0 or C == 0:
        return out
    if k_idx.stride(-1) != 1 or q_idx.stride(-1) != 1:
        q_idx, k_idx = q_idx.contiguous(), k_idx.contiguous()
    BLOCK_M, BLOCK_N = 64, 128
    grid = (triton.cdiv(R, BLOCK_M), triton.cdiv(C, BLOCK_N), N)
    with launch_env():
        _indexer_scores_kernel[grid](
            q_idx, k_idx, w, k_len.to(torch.int64).contiguous(), out, R, C, rows.start, cols.start, offset,
            q_idx.stride(0), q_idx.stride(1), q_idx.stride(2), k_idx.stride(0), k_idx.stride(1),
            w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
            HI, DI=DI, BLOCK_D=max(16, triton.next_power_of_2(DI)), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            CAUSAL=causal, IEEE=q_idx.dtype == torch.float32, num_warps=8 if DI > 64 else 4, num_stages=2,
        )
    return out
