"""DSA's lightning indexer fused with its top-k: each query's `k` best keys without writing the scores.

`I[n, i, j] = sum_h w[n, i, h] * relu(q_idx[n, i, h] . k_idx[n, j])` over the keys j visible to query
row i (j < the sequence's keys, and j <= i + offset when causal). Imported lazily by `methods.dsa`.

Why: at T = 65536 the causal half of the score matrix is 8.6 GB of float32. Writing it and reading
it back several times (a `torch.topk` or a radix select per row) costs many times the indexer's own
GEMM (Hi * Di multiply-adds per pair on tensor cores). Here the scores live only in registers and
are recomputed on every pass over the keys, so a pass costs about one indexer GEMM:

1. `_bracket_compact_kernel`, one program per `BLOCK_M` query rows. A row's state is a bracket of
   order-preserving 32-bit score keys `[lo, hi)` with `#(keys >= lo) >= k > #(keys >= hi)`, at
   first everything. Each round streams the key tiles, recomputes the scores (`tl.dot` per indexer
   head) and counts, per row, the keys at or above `EDGES` edges; the bracket becomes the pair of
   edges around the k-th largest, shrunk to the smallest and largest key it holds. Where the bracket
   meets the range of a small strided sample of the row's scores (taken first), the edges are that
   range's ends and points spaced evenly in score value between them (for `FLOAT_ROUNDS` rounds, or
   until value spacing stops splitting: then in key space, which always splits); elsewhere they are
   spaced evenly in key space over the bracket. A row is done when at most `cap` keys are at or
   above `lo`, or when the bracket holds a single key value (ties). A last pass compacts, in index
   order, every key at or above `hi` and the first `cap - #(keys >= hi)` of the bracket into a
   `[rows, cap]` buffer of (key, index).
2. `_buffer_select_kernel`, one program per row: the exact k-th largest key of the row's buffer
   (a bisection over key values, the buffer in registers), then every larger key and the first
   equal ones still needed, in index order.

So ties at the k-th value go to the smaller index, rows come out ascending (the `KVSelection`
layout), a row with fewer than k visible keys keeps all of them (-1 padded), and nothing depends on
timing (deterministic). The candidates of step 2 are exactly the top k: keys below `lo` are beaten
by at least k others, and the bracket is only cut (by index) when it holds a single value.
`-0.0` counts as `+0.0`; NaN scores are not supported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import launch_env
from ..jit import mm, pow2

# Triton's own combine functions, passed to `tl.reduce` / `tl.associative_scan` directly (not through
# `tl.sum`, a jit function built for whichever mode Triton was first imported in): on the GPU they
# compile like any combine function, and Triton's CPU interpreter runs them through NumPy instead of
# element by element, which keeps the interpreter twins of these many-pass kernels fast.
_SUM = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max
_MIN = tl.standard._elementwise_min

# launch knobs (module attributes: tests shrink them to many small tiles, the benchmark tunes them)
BLOCK_M = 64  # query rows per program of the bracket kernel
BLOCK_N = 128  # keys per tile
NUM_WARPS = 4
EDGES = 16  # counted edges per round (a power of two)
SAMPLE = 256  # strided sample keys per row block, for the first edges (a power of two, >= 16)
FLOAT_ROUNDS = 4  # rounds with value-spaced edges before key-spaced ones
CAP_FACTOR = 2  # buffer width: the power of two >= CAP_FACTOR * k (and >= MIN_CAP)
MIN_CAP = 1024
MAX_CAP = 16384  # the buffer row lives in registers in step 2; wider selections take another path
MAX_ROUNDS = tl.constexpr(64)
KEY_MIN = tl.constexpr(-2147483648)
KEY_MAX = tl.constexpr(2147483647)  # above every finite or infinite score's key


@triton.jit
def _key(x):
    """float32 -> int32 whose signed order is the floats' order (-0.0 taken as +0.0)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _value(key):
    """The inverse of `_key`: int32 key -> float32."""
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _scores(Q_ROWS, W_ROWS, stride_qh, stride_wh, kt, r_in, d_in, HI, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """`sum_h w[:, h] * relu(q[:, h] . k)` of a tile: `Q_ROWS [BLOCK_M, BLOCK_D]` pointers of head 0,
    `kt [BLOCK_D, BLOCK_N]` -> float32 `[BLOCK_M, BLOCK_N]` (heads summed in order 0..HI-1)."""
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for h in range(0, HI):
        q = tl.load(Q_ROWS + h * stride_qh, mask=r_in[:, None] & d_in[None, :], other=0.0)
        w = tl.load(W_ROWS + h * stride_wh, mask=r_in, other=0.0).to(tl.float32)
        acc += w[:, None] * tl.maximum(mm(q, kt, DOT_PREC), 0.0)
    return acc


@triton.jit
def _key_tile(K_SEQ, stride_kt, Q_ROWS, W_ROWS, stride_qh, stride_wh, c0, klen, pos, r_in, d, d_in, HI,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """Keys of the scores against key columns `c0 + [0, BLOCK_N)` and which of them each row sees."""
    j = c0 + tl.arange(0, BLOCK_N)
    k = tl.load(K_SEQ + j.to(tl.int64)[:, None] * stride_kt + d[None, :], mask=(j < klen)[:, None] & d_in[None, :],
                other=0.0)
    u = _key(_scores(Q_ROWS, W_ROWS, stride_qh, stride_wh, tl.trans(k), r_in, d_in, HI, BLOCK_M, BLOCK_N, DOT_PREC))
    vis = r_in[:, None] & (j < klen)[None, :]
    if CAUSAL:
        vis = vis & (j[None, :] <= pos[:, None])
    return u, vis, j


@triton.jit
def _prefix_count(x, tri):
    """Inclusive running count along each row of a boolean tile, as a dot with the upper-triangular
    ones `tri` (exact in float32; a tensor-core op on the dot's own layout, where a scan is not)."""
    return mm(tl.where(x, 1.0, 0.0).to(tl.float16), tri, "tf32").to(tl.int64)


@triton.jit
def _edges(lo, hi, s_lo, s_hi, by_value, cols, EDGES: tl.constexpr):
    """The edges `[BLOCK_M, EDGES]` (int64 keys, nondecreasing, inside `[lo, hi]`) of each row's
    bracket `[lo, hi)`. Where the bracket meets the sample's range `[s_lo, s_hi]`, the first and last
    edges are that range's ends and the others lie between, spaced evenly in value where `by_value`
    (else in key); elsewhere they are spaced evenly in key over the bracket."""
    a = tl.maximum(lo, s_lo)
    z = tl.minimum(hi, s_hi + 1)
    inside = a < z
    b = cols[None, :]
    use_value = (inside & by_value)[:, None]
    a_f = _value(tl.where(inside & by_value, a, 0).to(tl.int32))
    z_f = _value(tl.where(inside & by_value, z, 0).to(tl.int32))
    t = b.to(tl.float32) / (EDGES - 1)
    value_spaced = _key(a_f[:, None] + (z_f - a_f)[:, None] * t).to(tl.int64)
    key_spaced = a[:, None] + ((z - a)[:, None] * b) // (EDGES - 1)
    e = tl.where(use_value, value_spaced, key_spaced)
    e = tl.where(b == 0, a[:, None], tl.where(b == EDGES - 1, z[:, None], e))
    e = tl.minimum(tl.maximum(e, a[:, None]), z[:, None])
    spread = lo[:, None] + ((hi - lo)[:, None] * (b + 1)) // (EDGES + 1)
    return tl.where(inside[:, None], e, spread)


@triton.jit
def _bracket_compact_kernel(Q, K, W, KLEN, BUF_KEY, BUF_IDX, COUNT, ROUNDS, R, offset, k, cap,
                            stride_qn, stride_qt, stride_qh, stride_kn, stride_kt, stride_wn, stride_wt, stride_wh,
                            stride_bn, stride_br, stride_cn,
                            HI, DI: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, EDGES: tl.constexpr, SAMPLE: tl.constexpr,
                            FLOAT_ROUNDS: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                            KEEP_ROUNDS: tl.constexpr):
    pid_m, n = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1)  # causal: the longest rows first
    n64 = n.to(tl.int64)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows (row r sits at key position r + offset)
    r_in = r < R
    i = r.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_in = d < DI
    klen = tl.load(KLEN + n).to(tl.int64)
    pos = i + offset
    if CAUSAL:
        length = tl.minimum(tl.maximum(pos + 1, 0), klen)
        first = pid_m * BLOCK_M + offset  # the block's first row sees the fewest keys
        stop = tl.minimum(klen, tl.maximum(first + BLOCK_M, 0))
        lim = tl.minimum(klen, tl.maximum(first + 1, 0))
    else:
        length = tl.full((BLOCK_M,), 0, tl.int64) + klen
        stop = klen
        lim = klen
    length = tl.where(r_in, length, 0)
    K_SEQ = K + n64 * stride_kn
    Q_ROWS = Q + n64 * stride_qn + i[:, None] * stride_qt + d[None, :]
    W_ROWS = W + n64 * stride_wn + i * stride_wt

    # a strided sample of the keys every row of the block sees: the range of the first value-spaced edges
    js = (tl.arange(0, SAMPLE).to(tl.int64) * lim) // SAMPLE
    ks = tl.load(K_SEQ + js[:, None] * stride_kt + d[None, :], mask=(js < lim)[:, None] & d_in[None, :], other=0.0)
    us = _key(_scores(Q_ROWS, W_ROWS, stride_qh, stride_wh, tl.trans(ks), r_in, d_in, HI, BLOCK_M, SAMPLE, DOT_PREC))
    s_ok = r_in[:, None] & (js < lim)[None, :]
    s_lo = tl.reduce(tl.where(s_ok, us, KEY_MAX), 1, _MIN).to(tl.int64)
    s_hi = tl.reduce(tl.where(s_ok, us, KEY_MIN), 1, _MAX).to(tl.int64)  # empty: s_lo > s_hi

    lo = tl.full((BLOCK_M,), KEY_MIN, tl.int64)
    hi = tl.full((BLOCK_M,), KEY_MAX, tl.int64)
    n_lo = length  # keys at or above lo
    n_hi = tl.full((BLOCK_M,), 0, tl.int64)  # keys at or above hi
    flt_ok = tl.full((BLOCK_M,), 1, tl.int1)
    cols = tl.arange(0, EDGES)
    rnd = tl.full((), 0, tl.int32)
    todo = tl.reduce(((n_lo > cap) & (hi - lo > 1)).to(tl.int32), 0, _SUM)
    # key-spaced rounds always shrink a bracket of two or more keys, so this ends; MAX_ROUNDS only
    # guards the device against a defect (it is far above the 32-bit key space's need)
    while (todo > 0) & (rnd < MAX_ROUNDS):
        a = tl.maximum(lo, s_lo)
        z = tl.minimum(hi, s_hi + 1)
        by_value = flt_ok & (z - a > EDGES) & (rnd < FLOAT_ROUNDS)
        edges = _edges(lo, hi, s_lo, s_hi, by_value, cols, EDGES)
        edges32 = edges.to(tl.int32)
        counts = tl.full((BLOCK_M, EDGES), 0, tl.int32)
        in_lo = tl.full((BLOCK_M,), KEY_MAX, tl.int32)  # the smallest and largest key inside the bracket
        in_hi = tl.full((BLOCK_M,), KEY_MIN, tl.int32)
        lo32, hi32 = lo.to(tl.int32), hi.to(tl.int32)
        for c0 in range(0, stop, BLOCK_N):
            u, vis, j = _key_tile(K_SEQ, stride_kt, Q_ROWS, W_ROWS, stride_qh, stride_wh, c0, klen, pos, r_in, d,
                                  d_in, HI, BLOCK_M, BLOCK_N, CAUSAL, DOT_PREC)
            for b in tl.static_range(EDGES):
                e = tl.reduce(tl.where(cols[None, :] == b, edges32, 0), 1, _SUM)
                c = tl.reduce((vis & (u >= e[:, None])).to(tl.int32), 1, _SUM)
                counts += tl.where(cols[None, :] == b, c[:, None], 0)
            inb = vis & (u >= lo32[:, None]) & (u < hi32[:, None])
            in_lo = tl.minimum(in_lo, tl.reduce(tl.where(inb, u, KEY_MAX), 1, _MIN))
            in_hi = tl.maximum(in_hi, tl.reduce(tl.where(inb, u, KEY_MIN), 1, _MAX))
        # the new bracket is [e_{m-1}, e_m) for m = #(edges with count >= k), shrunk to the keys it holds
        m = tl.reduce((counts >= k).to(tl.int32), 1, _SUM)
        pick_lo = cols[None, :] == (m - 1)[:, None]
        pick_hi = cols[None, :] == m[:, None]
        active = (n_lo > cap) & (hi - lo > 1)
        new_lo = tl.where(m > 0, tl.reduce(tl.where(pick_lo, edges, 0), 1, _SUM), lo)
        new_nlo = tl.where(m > 0, tl.reduce(tl.where(pick_lo, counts, 0), 1, _SUM), n_lo)
        new_hi = tl.where(m < EDGES, tl.reduce(tl.where(pick_hi, edges, 0), 1, _SUM), hi)
        new_nhi = tl.where(m < EDGES, tl.reduce(tl.where(pick_hi, counts, 0), 1, _SUM), n_hi)
        stuck = (new_lo == lo) & (new_hi == hi)
        flt_ok = flt_ok & ~(active & by_value & stuck)  # value spacing could not split it: key spacing next
        lo = tl.where(active, tl.maximum(new_lo, in_lo.to(tl.int64)), lo)
        hi = tl.where(active, tl.minimum(new_hi, in_hi.to(tl.int64) + 1), hi)
        n_lo = tl.where(active, new_nlo, n_lo)
        n_hi = tl.where(active, new_nhi, n_hi)
        rnd += 1
        todo = tl.reduce(((n_lo > cap) & (hi - lo > 1)).to(tl.int32), 0, _SUM)

    # compact: every key >= hi, then bracket keys in index order while the buffer has room
    room = cap - n_hi
    seen = tl.full((BLOCK_M,), 0, tl.int64)
    taken = tl.full((BLOCK_M,), 0, tl.int64)
    lo32, hi32 = lo.to(tl.int32), hi.to(tl.int32)
    out_row = n64 * stride_bn + r.to(tl.int64) * stride_br
    tri = (tl.arange(0, BLOCK_N)[:, None] <= tl.arange(0, BLOCK_N)[None, :]).to(tl.float16)
    for c0 in range(0, stop, BLOCK_N):
        u, vis, j = _key_tile(K_SEQ, stride_kt, Q_ROWS, W_ROWS, stride_qh, stride_wh, c0, klen, pos, r_in, d,
                              d_in, HI, BLOCK_M, BLOCK_N, CAUSAL, DOT_PREC)
        inb = vis & (u >= lo32[:, None]) & (u < hi32[:, None])
        rank = seen[:, None] + _prefix_count(inb, tri) - 1
        sel = (vis & (u >= hi32[:, None])) | (inb & (rank < room[:, None]))
        at = taken[:, None] + _prefix_count(sel, tri) - 1
        tl.store(BUF_KEY + out_row[:, None] + at, u, mask=sel)
        idx = tl.broadcast_to(j.to(tl.int32)[None, :], (BLOCK_M, BLOCK_N))
        tl.store(BUF_IDX + out_row[:, None] + at, idx, mask=sel)
        taken += tl.reduce(sel.to(tl.int64), 1, _SUM)
        seen += tl.reduce(inb.to(tl.int64), 1, _SUM)
    tl.store(COUNT + n64 * stride_cn + r, taken.to(tl.int32), mask=r_in)
    if KEEP_ROUNDS:  # diagnostics: counting rounds of this program
        tl.store(ROUNDS + n64 * tl.num_programs(0) + pid_m, rnd)


@triton.jit
def _buffer_select_kernel(BUF_KEY, BUF_IDX, COUNT, OUT, R, k, stride_bn, stride_br, stride_cn, stride_on, stride_or,
                          CAP: tl.constexpr):
    row, n = tl.program_id(0), tl.program_id(1)
    n64 = n.to(tl.int64)
    cnt = tl.load(COUNT + n64 * stride_cn + row)
    p = tl.arange(0, CAP)
    ok = p < cnt
    base = n64 * stride_bn + row.to(tl.int64) * stride_br
    u = tl.load(BUF_KEY + base + p, mask=ok, other=KEY_MIN)
    idx = tl.load(BUF_IDX + base + p, mask=ok, other=-1)
    out = OUT + n64 * stride_on + row.to(tl.int64) * stride_or
    if cnt <= k:  # the buffer is the row's whole selection, already in index order
        tl.store(out + p, idx, mask=ok)
    else:  # bisection: t = the largest key with #(u >= t) >= k, the k-th largest
        lo = tl.full((), KEY_MIN, tl.int64)
        hi = tl.full((), KEY_MAX, tl.int64) + 1
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            c = tl.reduce((ok & (u >= mid.to(tl.int32))).to(tl.int32), 0, _SUM)
            big = c >= k
            lo = tl.where(big, mid, lo)
            hi = tl.where(big, hi, mid)
        t = lo.to(tl.int32)
        gt = ok & (u > t)
        eq = ok & (u == t)
        need = k - tl.reduce(gt.to(tl.int32), 0, _SUM)
        sel = gt | (eq & (tl.associative_scan(eq.to(tl.int32), 0, _SUM) <= need))
        at = tl.associative_scan(sel.to(tl.int32), 0, _SUM) - 1
        tl.store(out + at, idx, mask=sel)


def buffer_width(k: int, tk: int) -> int:
    """Candidates kept per row between the two steps: a power of two >= CAP_FACTOR * k, no wider than
    the keys need."""
    return min(pow2(CAP_FACTOR * k, MIN_CAP), pow2(tk, 16))


def supports(k: int, tk: int) -> bool:
    """Whether a top-`k` of `tk` keys fits the buffer (else the caller keeps another path)."""
    return buffer_width(k, tk) <= MAX_CAP


def indexer_topk(q_idx: torch.Tensor, k_idx: torch.Tensor, w: torch.Tensor, k_len: torch.Tensor, offset: int,
                 causal: bool, k: int, max_rows: int | None = None,
                 rounds: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Each query's `k` best keys by the lightning-indexer score: `q_idx [N, Tq, Hi, Di]`, `k_idx
    [N, Tk, Di]` (same dtype: half precision, or float32 with IEEE dots), `w [N, Tq, Hi]`, `k_len [N]`
    valid keys per sequence; query row i sits at key position `i + offset`. Returns int32
    `[N, Tq, min(k, Tk)]`, ascending, -1 padded; ties at the k-th score go to the smaller index.
    `max_rows` bounds the rows per launch (the buffer is `[N, rows, buffer_width]` int32 twice).
    `rounds`, a list, receives per launch the counting rounds of each program `[N, row blocks]`
    (what a pass count costs: each round and the compaction recompute the scores once)."""
    N, Tq, HI, DI = q_idx.shape
    Tk = k_idx.shape[1]
    width = min(k, Tk)
    out = torch.full((N, Tq, width), -1, dtype=torch.int32, device=q_idx.device)
    if out.numel() == 0:
        return out
    if not supports(k, Tk):
        raise ValueError(f"k: the fused indexer top-k keeps at most {MAX_CAP} candidates per row; k = {k} "
                         f"of {Tk} keys needs {buffer_width(k, Tk)}")
    if q_idx.stride(-1) != 1 or k_idx.stride(-1) != 1:
        q_idx, k_idx = q_idx.contiguous(), k_idx.contiguous()
    cap = buffer_width(k, Tk)
    rows = Tq if max_rows is None else max(1, min(Tq, max_rows))
    k_len = k_len.to(device=q_idx.device, dtype=torch.int64).contiguous()
    buf_key = torch.empty(N, rows, cap, dtype=torch.int32, device=q_idx.device)
    buf_idx = torch.empty_like(buf_key)
    count = torch.empty(N, rows, dtype=torch.int32, device=q_idx.device)
    prec = "ieee" if q_idx.dtype == torch.float32 else "tf32"
    with launch_env():
        for r0 in range(0, Tq, rows):
            R = min(rows, Tq - r0)
            blocks = triton.cdiv(R, BLOCK_M)
            rnd = torch.zeros(N, blocks if rounds is not None else 1, dtype=torch.int32, device=q_idx.device)
            _bracket_compact_kernel[(blocks, N)](
                q_idx[:, r0:], k_idx, w[:, r0:], k_len, buf_key, buf_idx, count, rnd, R, offset + r0, k, cap,
                q_idx.stride(0), q_idx.stride(1), q_idx.stride(2), k_idx.stride(0), k_idx.stride(1),
                w.stride(0), w.stride(1), w.stride(2), buf_key.stride(0), buf_key.stride(1), count.stride(0),
                HI, DI=DI, BLOCK_D=max(16, triton.next_power_of_2(DI)), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                EDGES=EDGES, SAMPLE=SAMPLE, FLOAT_ROUNDS=FLOAT_ROUNDS, CAUSAL=causal, DOT_PREC=prec,
                KEEP_ROUNDS=rounds is not None, num_warps=NUM_WARPS, num_stages=2,
            )
            if rounds is not None:
                rounds.append(rnd)
            o = out[:, r0:]
            _buffer_select_kernel[(R, N)](buf_key, buf_idx, count, o, R, k, buf_key.stride(0), buf_key.stride(1),
                                          count.stride(0), o.stride(0), o.stride(1), CAP=cap,
                                          num_warps=4 if cap <= 4096 else 8)
    return out
