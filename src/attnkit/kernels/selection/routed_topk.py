"""Triton kernel of block routing: gate scores against pooled keys and their top-k, fused on chip.

For query row i of head h, `s(i, b) = q_i . g_b` over the pooled key blocks b of its KV head (MoBA:
the block means). The row keeps the `topk` best candidates: the own block forced first,
non-candidates (blocks starting after the row, or past the sequence's keys) never.

Why a kernel: in PyTorch the `[Hq * T, T / block]` float32 score matrix (8.6 GB for the causal half
at T = 64K, Hq = 64, block 64) is written by a GEMM and read back by a streaming `torch.topk`, which
costs much more than the GEMM itself. Here a program holds `BLOCK_M` query rows of one head and walks the column
tiles up to its causal limit; the scores of a tile live in registers and are merged into a running
per-row top-K, so no score reaches memory.

Keys: each score is packed with its block index into one int64 (`order-preserving bits of the
float32 score << 32 | index`), so keys are distinct, comparisons are integer, and equal scores
resolve to the larger index. The running top-K merges a tile with a bitonic network: the tile's
chunks of K keys are sorted descending (`tl.sort`), the running top-K is kept ascending, their
elementwise maximum is the top K of the union as a bitonic sequence (the half-cleaner), and log2(K)
compare-exchange stages sort it again. That is O(log^2 K) integer ops per score, independent of
the data, against O(K) reductions per score for extraction by repeated maxima (the measured
comparison is in docs/executors.md, "The selection engine").

`group_prob_topk` is NSA's variant: the dot operand holds all heads of a KV group for a few query
rows, and the tile's score is the compressed-attention probability summed over those heads.

The bf16 path takes the pooled keys as three bf16 terms (`methods.gemm.split_half`): each dot
multiplies exactly into float32, so the scores are the float32 gate up to summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import launch_env
from ..jit import dot_precision, mm

# below every packed (score, index) key: a float32 score's key is >= -2**31 + 2**23 (finite)
EMPTY = tl.constexpr(-9_200_000_000_000_000_000)
FORCED = tl.constexpr(0x7F800000)  # +inf's key: a forced block ranks above every finite score
MAX_TOPK = 64  # the running top-K lives in registers; wider selections stay on the PyTorch path
# launch knobs (module attributes: tests shrink them to many small tiles, the benchmark tunes them)
BLOCK_M = 128  # query rows per program
MIN_BLOCK_N = 32  # columns per tile (at least K; a dot needs 16)
NUM_WARPS = 8  # (BLOCK_M, MIN_BLOCK_N, NUM_WARPS) = (128, 32, 8): the fastest configuration of a sweep
# for MoBA's top-16 at T = 64K (docs/executors.md, "The selection engine")


@triton.jit
def _bitonic_ascending(x, R: tl.constexpr, K: tl.constexpr, LOG_K: tl.constexpr):
    """Sort each row of `x [R, K]`, a bitonic sequence, ascending: log2(K) half-cleaner stages."""
    for j in tl.static_range(LOG_K):
        x4 = tl.reshape(x, (R, 1 << j, 2, K >> (j + 1)))  # pairs at distance K / 2^(j+1)
        lo = tl.min(x4, axis=2)
        hi = tl.max(x4, axis=2)
        upper = tl.reshape(tl.arange(0, 2), (1, 1, 2, 1)) == 1
        x4 = tl.where(upper, tl.expand_dims(hi, 2), tl.expand_dims(lo, 2))
        x = tl.reshape(x4, (R, K))
    return x


@triton.jit
def _merge_tile(best, s, c, cand, forced, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr,
                LOG_K: tl.constexpr):
    """Merge a tile of float32 scores `s [BLOCK_M, BLOCK_N]` of columns `c` into the running top-K
    `best [BLOCK_M, K]` (packed keys, ascending): candidates by score, forced columns first."""
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed order of the keys = order of the floats
    key = tl.where(forced, FORCED, key)
    packed = (key.to(tl.int64) << 32) | c.to(tl.int64)[None, :]
    packed = tl.where(cand | forced, packed, EMPTY)
    C: tl.constexpr = BLOCK_N // K  # chunks of K keys per column tile
    tile = tl.sort(tl.reshape(packed, (BLOCK_M, C, K)), descending=True)  # each chunk descending
    chunk = tl.reshape(tl.arange(0, BLOCK_N) // K, (1, C, K))
    for ci in tl.static_range(C):
        part = tl.max(tl.where(chunk == ci, tile, EMPTY), axis=1) if C > 1 else tl.reshape(tile, (BLOCK_M, K))
        best = _bitonic_ascending(tl.maximum(best, part), BLOCK_M, K, LOG_K)
    return best


@triton.jit
def _store_rows(best, keep, out_rows, r_in, width, K: tl.constexpr):
    """Write each row's `keep` best keys' indices (`keep [BLOCK_M]`, at most `width`) ascending, -1 last."""
    kcol = tl.arange(0, K)
    take = (best != EMPTY) & (kcol[None, :] >= K - keep[:, None])
    idx = tl.where(take, (best & 0x7FFFFFFF).to(tl.int32), 0x7FFFFFFF)
    idx = tl.sort(idx)
    idx = tl.where(idx == 0x7FFFFFFF, -1, idx)
    tl.store(out_rows[:, None] + kcol[None, :], idx, mask=r_in[:, None] & (kcol < width)[None, :])


@triton.jit
def _routed_topk_kernel(Q, GK, KLEN, OUT, Tq, nk, offset, group, block_size, width, D,
                        stride_qn, stride_qt, stride_qh, stride_gn, stride_gh, stride_gt, stride_gd,
                        stride_on, stride_oh, stride_ot,
                        TERMS: tl.constexpr, K: tl.constexpr, LOG_K: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                        DOT_PREC: tl.constexpr):
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
    best = tl.full((BLOCK_M, K), EMPTY, tl.int64)  # ascending
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
        best = _merge_tile(best, s, c, cand, forced, BLOCK_M, BLOCK_N, K, LOG_K)
    out_rows = OUT + n64 * stride_on + h * stride_oh + r.to(tl.int64) * stride_ot
    _store_rows(best, tl.full((BLOCK_M,), width, tl.int32), out_rows, r_in, width, K)


def routed_topk(q: torch.Tensor, gate_keys: torch.Tensor, k_len: torch.Tensor, offset: int, causal: bool,
                block_size: int, topk: int) -> torch.Tensor:
    """Block selection of a sequence view: per query row, the own block plus the best-gated candidates.

    `q [N, Tq, Hq, D]`; `gate_keys [N, Hkv, TERMS, D, nk]` the pooled keys (TERMS = 3 bf16 split
    terms for bf16 `q`, else 1 term in `q`'s dtype); `k_len [N]` valid keys per sequence; query row i
    sits at key position `i + offset`. Returns int32 `[N, Hq, Tq, min(topk, nk)]`, each row's block
    ids ascending with -1 padding last (where a row has fewer candidates): `KVSelection`'s layout."""
    N, Tq, Hq, D = q.shape
    _, Hkv, terms, _, nk = gate_keys.shape
    width = min(topk, nk)
    out = torch.empty(N, Hq, Tq, width, dtype=torch.int32, device=q.device)
    if out.numel() == 0:
        return out.fill_(-1)
    if not 1 <= width <= MAX_TOPK:
        raise ValueError(f"topk: the routed top-k kernel serves 1..{MAX_TOPK} blocks, got {width}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    gate_keys = gate_keys.contiguous()
    block_d = max(16, triton.next_power_of_2(D))
    k = max(2, triton.next_power_of_2(width))
    block_n = max(MIN_BLOCK_N, k)
    grid = (triton.cdiv(Tq, BLOCK_M), Hq, N)
    with launch_env():
        _routed_topk_kernel[grid](
            q, gate_keys, k_len.to(torch.int64).contiguous(), out, Tq, nk, offset, Hq // Hkv, block_size, width, D,
            q.stride(0), q.stride(1), q.stride(2), gate_keys.stride(0), gate_keys.stride(1), gate_keys.stride(2),
            gate_keys.stride(3), out.stride(0), out.stride(1), out.stride(2),
            TERMS=terms, K=k, LOG_K=k.bit_length() - 1, BLOCK_D=block_d, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
            CAUSAL=causal, DOT_PREC=dot_precision(q.dtype), num_warps=NUM_WARPS, num_stages=2,
        )
    return out


@triton.jit
def _group_prob_topk_kernel(Q, KC, NLSE, KLEN, OUT, Tq, nk, nc, offset, G, block_size, width, topk, D, scale,
                            stride_qn, stride_qt, stride_qh, stride_kn, stride_kh, stride_kd,
                            stride_ln, stride_lh, stride_lt, stride_on, stride_oh, stride_ot,
                            GP: tl.constexpr, K: tl.constexpr, LOG_K: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                            DOT_PREC: tl.constexpr):
    pid_m, hk, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n64 = n.to(tl.int64)
    m = tl.arange(0, BLOCK_M * GP)  # (token, head of the group) rows of the dot
    t = pid_m * BLOCK_M + m // GP
    g = m % GP
    m_in = (t < Tq) & (g < G)
    h = hk * G + g
    d = tl.arange(0, BLOCK_D)
    d_in = d < D
    q = tl.load(Q + n64 * stride_qn + t.to(tl.int64)[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :],
                mask=m_in[:, None] & d_in[None, :], other=0.0)
    nlse = tl.load(NLSE + n64 * stride_ln + h * stride_lh + t.to(tl.int64) * stride_lt, mask=m_in, other=0.0)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_in = r < Tq
    p = r + offset
    own = p // block_size
    klen = tl.load(KLEN + n)
    stop = nk
    if CAUSAL:  # columns past the last row's own block are neither visible nor forced (block 0 always is)
        last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, Tq) - 1 + offset
        stop = tl.minimum(nk, tl.maximum(1, last // block_size + 1))
    best = tl.full((BLOCK_M, K), EMPTY, tl.int64)
    k_base = KC + n64 * stride_kn + hk * stride_kh + d[:, None] * stride_kd
    for c0 in range(0, stop, BLOCK_N):
        c = c0 + tl.arange(0, BLOCK_N)
        c_in = c < stop
        kc = tl.load(k_base + c[None, :], mask=d_in[:, None] & (c_in & (c < nc))[None, :], other=0.0)
        prob = tl.exp(mm(q, kc, DOT_PREC) * scale + nlse[:, None])
        prob = tl.where(m_in[:, None], prob, 0.0)
        prob = tl.sum(tl.reshape(prob, (BLOCK_M, GP, BLOCK_N)), axis=1)  # over the group's heads
        last_key = (c + 1) * block_size - 1
        cand = (c_in & (c < nc) & (last_key < klen))[None, :] & r_in[:, None]
        if CAUSAL:
            cand = cand & (last_key[None, :] <= p[:, None])
        forced = ((c[None, :] == 0) | (c[None, :] == own[:, None]) | (c[None, :] == own[:, None] - 1))
        forced = forced & c_in[None, :] & r_in[:, None]
        best = _merge_tile(best, prob, c, cand, forced, BLOCK_M, BLOCK_N, K, LOG_K)
    n_forced = 1 + tl.minimum(tl.maximum(own, 0), 2)
    keep = tl.minimum(width, tl.maximum(topk, n_forced))
    out_rows = OUT + n64 * stride_on + hk * stride_oh + r.to(tl.int64) * stride_ot
    _store_rows(best, keep, out_rows, r_in, width, K)


NSA_ROWS = 128  # dot rows per program of the group kernel: BLOCK_M tokens x the group's heads


def group_prob_topk(q: torch.Tensor, kc: torch.Tensor, lse: torch.Tensor, k_len: torch.Tensor, nk: int,
                    offset: int, causal: bool, block_size: int, topk: int, scale: float) -> torch.Tensor:
    """NSA's selection of a sequence view: per KV group and query row, the first, own and previous
    blocks plus the blocks of highest compressed-attention probability summed over the group's heads.

    `q [N, Tq, Hq, D]`; `kc [N, Hkv, D, nc]` the compressed keys (complete block means, q's dtype);
    `lse [N, Hq, Tq]` the compressed branch's LSE (-inf where a row sees no compressed block); `k_len
    [N]`; `nk` key blocks (the incomplete last one included); query row i sits at key position
    `i + offset`. Returns int32 `[N, Hkv, Tq, min(max(topk, 3), nk)]`, ids ascending, -1 last; a row
    keeps `max(topk, its forced blocks)` ids."""
    N, Tq, Hq, D = q.shape
    _, Hkv, _, nc = kc.shape
    width = min(max(topk, 3), nk)
    out = torch.empty(N, Hkv, Tq, width, dtype=torch.int32, device=q.device)
    if out.numel() == 0:
        return out.fill_(-1)
    if not 1 <= width <= MAX_TOPK:
        raise ValueError(f"topk: the routed top-k kernel serves 1..{MAX_TOPK} blocks, got {width}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    kc = kc.contiguous()
    nlse = torch.where(torch.isinf(lse), torch.zeros((), dtype=torch.float32, device=lse.device),
                       -lse.to(torch.float32)).contiguous()
    G = Hq // Hkv
    gp = triton.next_power_of_2(G)
    block_m = max(1, NSA_ROWS // gp)
    block_d = max(16, triton.next_power_of_2(D))
    k = max(2, triton.next_power_of_2(width))
    block_n = max(MIN_BLOCK_N, k)
    grid = (triton.cdiv(Tq, block_m), Hkv, N)
    with launch_env():
        _group_prob_topk_kernel[grid](
            q, kc, nlse, k_len.to(torch.int64).contiguous(), out, Tq, nk, nc, offset, G, block_size, width, topk, D,
            float(scale), q.stride(0), q.stride(1), q.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
            nlse.stride(0), nlse.stride(1), nlse.stride(2), out.stride(0), out.stride(1), out.stride(2),
            GP=gp, K=k, LOG_K=k.bit_length() - 1, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
            CAUSAL=causal, DOT_PREC=dot_precision(q.dtype), num_warps=NUM_WARPS, num_stages=2,
        )
    return out
