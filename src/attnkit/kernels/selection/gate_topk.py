"""Triton kernel of MoBA's routing: gate scores against the block means and their top-k, fused.

For query row i of head h, `s(i, b) = q_i . mean_b` over the key blocks b of its KV head; the row
keeps the `topk` best candidates (the own block forced first, non-candidates never). Imported
lazily by `methods.moba` (never by `import attnkit`).

Why a kernel: in PyTorch the `[Hq * T, T / block]` float32 score matrix (8.6 GB for the causal
half at T = 64K, Hq = 64, block 64) is written by a GEMM, masked, and read back by a streaming
`torch.topk`; that selection took 129 of MoBA's 184 ms forward on an H100. Here a program holds
`BLOCK_M` query rows of one head and walks the column tiles of block means; the scores of a tile
live in registers and are merged into a running top-k per row, so no score reaches memory.

The running top-k merges by extraction: each score is packed with its block index into one
int64 (`order-preserving bits of the float32 score << 32 | index`), so a row's largest remaining
key is a `max`, distinct keys make removal exact, and equal scores resolve to the larger index.
`K` rounds of (max, place, remove) per column tile cost O(K) integer ops per score, on chip.
The bf16 path takes the block means as three bf16 terms (`methods.gemm.split_half`): each dot
multiplies exactly into float32, so the scores are the float32 gate up to summation order.

Opt-in (`ATTNKIT_MOBA_GATE_KERNEL=1`, see `methods.moba`) until it has run on a GPU: it was built
and tested in Triton's CPU interpreter only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import launch_env
from ..jit import dot_precision, max_combine, mm  # core builtins only in kernels (see jit.py)
from ...core.contract import AttnkitError

# below every packed (score, index) key: a float32 score's key is >= -2**31 + 2**23 (finite)
EMPTY = tl.constexpr(-9_200_000_000_000_000_000)
MAX_TOPK = 64  # the merge unrolls K rounds; wider selections stay on the PyTorch path
# launch knobs (module attributes so the interpreter tests can shrink them to many small tiles)
BLOCK_M = 64  # query rows per program (32 when a row of q takes more than 256 bytes)
BLOCK_N = 64  # blocks per column tile


@triton.jit
def _gate_topk_kernel(Q, GK, KLEN, OUT, Tq, nk, offset, group, block_size, width, D,
                      stride_qn, stride_qt, stride_qh, stride_gn, stride_gh, stride_gt, stride_gd,
                      stride_on, stride_oh, stride_ot,
                      TERMS: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m, h, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n64 = n.to(tl.int64)
    hk = h // group
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_in = r < Tq
    p = r + offset  # key position of each query row (bottom-right alignment)
    own = p // block_size
    d = tl.arange(0, BLOCK_D)
    d_in = d < D
    q = tl.load(Q + n64 * stride_qn + r.to(tl.int64)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=r_in[:, None] & d_in[None, :], other=0.0)
    klen = tl.load(KLEN + n)
    stop = nk
    if CAUSAL:  # no row of the tile sees a block starting after its last row's position
        last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, Tq) - 1 + offset
        stop = tl.minimum(nk, last // block_size + 1)
    kcol = tl.arange(0, K)
    best = tl.full((BLOCK_M, K), EMPTY, tl.int64)
    g_base = GK + n64 * stride_gn + hk * stride_gh + d[:, None] * stride_gd
    for c0 in range(0, stop, BLOCK_N):
        c = c0 + tl.arange(0, BLOCK_N)
        c_in = c < stop
        s = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for t in tl.static_range(TERMS):
            g = tl.load(g_base + t * stride_gt + c[None, :], mask=d_in[:, None] & c_in[None, :], other=0.0)
            s += mm(q, g, DOT_PREC)
        first = c * block_size
        cand = (c_in & (first < klen))[None, :] & r_in[:, None]
        if CAUSAL:
            cand = cand & (first[None, :] <= p[:, None])
        forced = (own[:, None] == c[None, :]) & c_in[None, :] & r_in[:, None]
        bits = s.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed order of the keys = order of the floats
        key = tl.where(forced, 0x7F800000, key)  # +inf's key: the own block comes first
        packed = (key.to(tl.int64) << 32) | c.to(tl.int64)[None, :]
        packed = tl.where(cand | forced, packed, EMPTY)
        merged = tl.full((BLOCK_M, K), EMPTY, tl.int64)
        for rank in tl.static_range(K):
            top = tl.maximum(tl.reduce(packed, 1, max_combine), tl.reduce(best, 1, max_combine))
            merged = tl.where(kcol[None, :] == rank, top[:, None], merged)
            packed = tl.where(packed == top[:, None], EMPTY, packed)
            best = tl.where(best == top[:, None], EMPTY, best)
        best = merged
    idx = tl.where(best == EMPTY, -1, best.to(tl.int32))  # the low 32 bits: the index
    out = OUT + n64 * stride_on + h * stride_oh + r.to(tl.int64)[:, None] * stride_ot + kcol[None, :]
    tl.store(out, idx, mask=r_in[:, None] & (kcol < width)[None, :])


def gate_topk(q: torch.Tensor, gate_keys: torch.Tensor, k_len: torch.Tensor, offset: int, causal: bool,
              block_size: int, topk: int) -> torch.Tensor:
    """MoBA's block selection of a sequence view.

    `q [N, Tq, Hq, D]`; `gate_keys [N, Hkv, TERMS, D, nk]` the block means (TERMS = 3 bf16 split
    terms for bf16 `q`, else 1 term in `q`'s dtype); `k_len [N]` valid keys per sequence; query row i
    sits at key position `i + offset`. Returns int32 `[N, Hq, Tq, min(topk, nk)]`, each row's blocks
    in descending gate order, -1 where a row has fewer candidates."""
    N, Tq, Hq, D = q.shape
    _, Hkv, terms, _, nk = gate_keys.shape
    width = min(topk, nk)
    out = torch.empty(N, Hq, Tq, width, dtype=torch.int32, device=q.device)
    if out.numel() == 0:
        return out.fill_(-1)
    if not 1 <= width <= MAX_TOPK:
        raise AttnkitError(f"topk: the gate kernel serves 1..{MAX_TOPK} blocks, got {width}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    gate_keys = gate_keys.contiguous()
    block_d = max(16, triton.next_power_of_2(D))
    block_m = BLOCK_M if block_d * q.element_size() <= 256 else max(16, BLOCK_M // 2)
    grid = (triton.cdiv(Tq, block_m), Hq, N)
    with launch_env():
        _gate_topk_kernel[grid](
            q, gate_keys, k_len.to(torch.int64).contiguous(), out, Tq, nk, offset, Hq // Hkv, block_size, width, D,
            q.stride(0), q.stride(1), q.stride(2), gate_keys.stride(0), gate_keys.stride(1), gate_keys.stride(2),
            gate_keys.stride(3), out.stride(0), out.stride(1), out.stride(2),
            TERMS=terms, K=max(2, triton.next_power_of_2(width)), BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
            CAUSAL=causal, DOT_PREC=dot_precision(q.dtype), num_warps=8, num_stages=2,
        )
    return out
