"""Triton kernels of the sparse executor: attention over the keys a `KVSelection` lists.

Imported only through `attnkit.kernels.load()` (never by `import attnkit`). Every tensor arrives
packed: `q: [Tq_total, Hq, D]`, `k: [Tk_total, Hkv, D]`, `v: [Tk_total, Hkv, Dv]`, with
`cu_q`/`cu_k` (int32 `[N+1]`) giving each sequence's token range, so batched and varlen calls are
one case (a batch of B sequences is `cu = [0, T, 2T, ...]`). LSE and delta are `[Hq, Tq_total]`
float32. Selection indices stay `[N, Hsel, Nq, S]` int32 (-1 padded), block ids local to their
sequence. Token offsets are int64, so `T * H * D` may pass 2^31.

A query tile is `BLOCK_M` rows. Each row is one (token, query head) pair:
    row r -> token t0 + r // RH, head h0 + r % RH
- block mode (`RH == 1`): `BLOCK_M` consecutive tokens of one query head; `BLOCK_M` divides
  `q_block`, so the whole tile reads one selection row.
- token mode (`RH == BLOCK_M`): one token, the `R` query heads that share its selection row
  (the query heads of a KV group when `Hsel` is `Hkv` or 1: MoBA / NSA / DSA style).
Keys are visited per selected block in tiles of `BLOCK_N` (contiguous keys), or, when `GATHER`
(small `k_block`, DSA's `k_block == 1`), `BLOCK_N` entries of the selection row at a time with
each key gathered by index.

Softmax runs in base 2 (`qk_scale = scale * log2(e)`) with fp32 accumulation; LSE is returned in
natural log. A row that sees no key has `l == 0`: its output is 0 and its LSE `-inf`.

Backward: `_bwd_dq_kernel` walks the forward's tiles and writes dq (and, when `ATOMIC_KV`, adds
dk/dv into float32 buffers atomically: used for gathered keys); `_bwd_dkdv_kernel` owns one key
tile and walks a reverse index (CSR: for each selected key block, the query blocks that list it),
so dk/dv are written once, without atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..jit import LN2, LOG2E, max_combine, mm, sum_combine  # noqa: F401  (LN2, LOG2E: for the launchers)

@triton.jit
def _row_coords(t0, h0, R, len_q, BLOCK_M: tl.constexpr, RH: tl.constexpr):
    r = tl.arange(0, BLOCK_M)
    tok = t0 + r // RH
    head = h0 + r % RH
    valid = (tok < len_q) & ((r % RH) < R)
    return tok, head, valid


@triton.jit
def _key_tile(kn, kvalid, k_base, v_base, stride_kt, stride_vt,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr):
    """Load K^T [BLOCK_D, BLOCK_N] and V [BLOCK_N, BLOCK_DV] for key positions `kn`."""
    dk = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    kn64 = kn.to(tl.int64)
    kT = tl.load(k_base + kn64[None, :] * stride_kt + dk[:, None],
                 mask=kvalid[None, :] & (dk[:, None] < D), other=0.0)
    v = tl.load(v_base + kn64[:, None] * stride_vt + dv[None, :],
                mask=kvalid[:, None] & (dv[None, :] < DV), other=0.0)
    return kT, v


@triton.jit
def _visible(kn, kvalid, qpos, row_valid, CAUSAL: tl.constexpr):
    vis = row_valid[:, None] & kvalid[None, :]
    if CAUSAL:
        vis = vis & (kn[None, :] <= qpos[:, None])
    return vis


@triton.jit
def _fwd_step(q, acc, m_i, l_i, kn, kvalid, qpos, row_valid, k_base, v_base, stride_kt, stride_vt, qk_scale,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
              CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    kT, v = _key_tile(kn, kvalid, k_base, v_base, stride_kt, stride_vt, BLOCK_D, BLOCK_DV, D, DV)
    s = mm(q, kT, DOT_PREC) * qk_scale
    s = tl.where(_visible(kn, kvalid, qpos, row_valid, CAUSAL), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(s, 1, max_combine))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.reduce(p, 1, sum_combine)
    acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, IDX, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_ib, stride_ih, stride_in, stride_lh,
    S, q_block, k_block, G, HSEL_DIV, R, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RH: tl.constexpr,
    GATHER: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    pid_h = tl.program_id(2)
    TOK: tl.constexpr = BLOCK_M // RH
    q_start = tl.load(CU_Q + seq)
    len_q = tl.load(CU_Q + seq + 1) - q_start
    k_start = tl.load(CU_K + seq)
    len_k = tl.load(CU_K + seq + 1) - k_start
    t0 = pid_m * TOK
    if t0 < len_q:
        h0 = pid_h * R
        hk = h0 // G
        hs = h0 // HSEL_DIV
        tok, head, row_valid = _row_coords(t0, h0, R, len_q, BLOCK_M, RH)
        shift = len_k - len_q
        qpos = tok + shift
        tok64 = (q_start + tok).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        q = tl.load(Q + tok64[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_valid[:, None] & (d[None, :] < D), other=0.0)
        k_base = K + k_start.to(tl.int64) * stride_kt + hk * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + hk * stride_vh
        idx_row = IDX + seq.to(tl.int64) * stride_ib + hs * stride_ih + (t0 // q_block).to(tl.int64) * stride_in
        acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        if GATHER:
            n_entries = S * k_block
            for e0 in range(0, n_entries, BLOCK_N):
                e = e0 + tl.arange(0, BLOCK_N)
                kb = tl.load(idx_row + e // k_block, mask=e < n_entries, other=-1)
                kn = kb * k_block + e % k_block
                kvalid = (kb >= 0) & (kn < len_k)
                acc, m_i, l_i = _fwd_step(q, acc, m_i, l_i, kn, kvalid, qpos, row_valid, k_base, v_base,
                                          stride_kt, stride_vt, qk_scale, BLOCK_D, BLOCK_DV, D, DV, CAUSAL, DOT_PREC)
        else:
            last_q = tl.minimum(t0 + TOK, len_q) - 1 + shift  # the tile's last query, in key coordinates
            for s_i in range(0, S):
                kb = tl.load(idx_row + s_i)
                kstart = kb * k_block
                kstop = tl.minimum(kstart + k_block, len_k)
                kend = kstop
                if CAUSAL:
                    kend = tl.minimum(kend, last_q + 1)
                kend = tl.where(kb >= 0, kend, kstart)
                for j in range(kstart, kend, BLOCK_N):
                    kn = j + tl.arange(0, BLOCK_N)
                    kvalid = kn < kstop
                    acc, m_i, l_i = _fwd_step(q, acc, m_i, l_i, kn, kvalid, qpos, row_valid, k_base, v_base,
                                              stride_kt, stride_vt, qk_scale, BLOCK_D, BLOCK_DV, D, DV, CAUSAL,
                                              DOT_PREC)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        tl.store(O + tok64[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :],
                 out.to(O.dtype.element_ty), mask=row_valid[:, None] & (dv[None, :] < DV))
        tl.store(LSE + head.to(tl.int64) * stride_lh + (q_start + tok).to(tl.int64), lse, mask=row_valid)


@triton.jit
def _bwd_dq_step(q, do, dq, lse2, delta, kn, kvalid, qpos, row_valid, k_base, v_base, dk_base, dv_base,
                 stride_kt, stride_vt, stride_dkt, stride_dvt, qk_scale, sm_scale,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                 CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, ATOMIC_KV: tl.constexpr):
    kT, v = _key_tile(kn, kvalid, k_base, v_base, stride_kt, stride_vt, BLOCK_D, BLOCK_DV, D, DV)
    s = mm(q, kT, DOT_PREC) * qk_scale
    vis = _visible(kn, kvalid, qpos, row_valid, CAUSAL)
    p = tl.where(vis, tl.math.exp2(s - lse2[:, None]), 0.0)
    dp = mm(do, tl.trans(v), DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += mm(ds.to(kT.dtype), tl.trans(kT), DOT_PREC)
    if ATOMIC_KV:
        kn64 = kn.to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        dvr = tl.arange(0, BLOCK_DV)
        pdv = mm(tl.trans(p.to(do.dtype)), do, DOT_PREC)
        pdk = mm(tl.trans(ds.to(q.dtype)), q, DOT_PREC) * sm_scale
        tl.atomic_add(dv_base + kn64[:, None] * stride_dvt + dvr[None, :], pdv,
                      mask=kvalid[:, None] & (dvr[None, :] < DV))
        tl.atomic_add(dk_base + kn64[:, None] * stride_dkt + d[None, :], pdk,
                      mask=kvalid[:, None] & (d[None, :] < D))
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, DK_PTR, DV_PTR, LSE, DELTA, IDX, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    stride_ib, stride_ih, stride_in, stride_lh,
    S, q_block, k_block, G, HSEL_DIV, R, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RH: tl.constexpr,
    GATHER: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, ATOMIC_KV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    pid_h = tl.program_id(2)
    TOK: tl.constexpr = BLOCK_M // RH
    q_start = tl.load(CU_Q + seq)
    len_q = tl.load(CU_Q + seq + 1) - q_start
    k_start = tl.load(CU_K + seq)
    len_k = tl.load(CU_K + seq + 1) - k_start
    t0 = pid_m * TOK
    if t0 < len_q:
        h0 = pid_h * R
        hk = h0 // G
        hs = h0 // HSEL_DIV
        tok, head, row_valid = _row_coords(t0, h0, R, len_q, BLOCK_M, RH)
        shift = len_k - len_q
        qpos = tok + shift
        tok64 = (q_start + tok).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        dvr = tl.arange(0, BLOCK_DV)
        q = tl.load(Q + tok64[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_valid[:, None] & (d[None, :] < D), other=0.0)
        do = tl.load(DO + tok64[:, None] * stride_dot + head[:, None] * stride_doh + dvr[None, :],
                     mask=row_valid[:, None] & (dvr[None, :] < DV), other=0.0)
        lrow = head.to(tl.int64) * stride_lh + tok64
        lse = tl.load(LSE + lrow, mask=row_valid, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(DELTA + lrow, mask=row_valid, other=0.0)
        k_base = K + k_start.to(tl.int64) * stride_kt + hk * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + hk * stride_vh
        dk_base = DK_PTR + k_start.to(tl.int64) * stride_dkt + hk * stride_dkh
        dv_base = DV_PTR + k_start.to(tl.int64) * stride_dvt + hk * stride_dvh
        idx_row = IDX + seq.to(tl.int64) * stride_ib + hs * stride_ih + (t0 // q_block).to(tl.int64) * stride_in
        dq = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
        if GATHER:
            n_entries = S * k_block
            for e0 in range(0, n_entries, BLOCK_N):
                e = e0 + tl.arange(0, BLOCK_N)
                kb = tl.load(idx_row + e // k_block, mask=e < n_entries, other=-1)
                kn = kb * k_block + e % k_block
                kvalid = (kb >= 0) & (kn < len_k)
                dq = _bwd_dq_step(q, do, dq, lse2, delta, kn, kvalid, qpos, row_valid, k_base, v_base, dk_base,
                                  dv_base, stride_kt, stride_vt, stride_dkt, stride_dvt, qk_scale, sm_scale,
                                  BLOCK_D, BLOCK_DV, D, DV, CAUSAL, DOT_PREC, ATOMIC_KV)
        else:
            last_q = tl.minimum(t0 + TOK, len_q) - 1 + shift
            for s_i in range(0, S):
                kb = tl.load(idx_row + s_i)
                kstart = kb * k_block
                kstop = tl.minimum(kstart + k_block, len_k)
                kend = kstop
                if CAUSAL:
                    kend = tl.minimum(kend, last_q + 1)
                kend = tl.where(kb >= 0, kend, kstart)
                for j in range(kstart, kend, BLOCK_N):
                    kn = j + tl.arange(0, BLOCK_N)
                    kvalid = kn < kstop
                    dq = _bwd_dq_step(q, do, dq, lse2, delta, kn, kvalid, qpos, row_valid, k_base, v_base, dk_base,
                                      dv_base, stride_kt, stride_vt, stride_dkt, stride_dvt, qk_scale, sm_scale,
                                      BLOCK_D, BLOCK_DV, D, DV, CAUSAL, DOT_PREC, ATOMIC_KV)
        tl.store(DQ + tok64[:, None] * stride_dqt + head[:, None] * stride_dqh + d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_valid[:, None] & (d[None, :] < D))


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK_PTR, DV_PTR, LSE, DELTA, QOFF, QLIST, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
    q_block, k_block, n_sub, NKB, HSEL, G, HSEL_DIV, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Q_GATHER: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One program: BLOCK_N keys of one KV head; walks every query (block) that selected them,
    over the G query heads of the group. `QOFF [N * HSEL * NKB + 1]` / `QLIST` is the CSR reverse
    index of the selection (query-block ids, per (sequence, selection head, key block))."""
    pid_k = tl.program_id(0)
    seq = tl.program_id(1)
    hk = tl.program_id(2)
    kb = pid_k // n_sub
    q_start = tl.load(CU_Q + seq)
    len_q = tl.load(CU_Q + seq + 1) - q_start
    k_start = tl.load(CU_K + seq)
    len_k = tl.load(CU_K + seq + 1) - k_start
    k0 = kb * k_block + (pid_k % n_sub) * BLOCK_N
    kstop = tl.minimum(kb * k_block + k_block, len_k)
    if k0 < kstop:
        shift = len_k - len_q
        kn = k0 + tl.arange(0, BLOCK_N)
        kvalid = kn < kstop
        kn64 = (k_start + kn).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        dvr = tl.arange(0, BLOCK_DV)
        k = tl.load(K + kn64[:, None] * stride_kt + hk * stride_kh + d[None, :],
                    mask=kvalid[:, None] & (d[None, :] < D), other=0.0)
        v = tl.load(V + kn64[:, None] * stride_vt + hk * stride_vh + dvr[None, :],
                    mask=kvalid[:, None] & (dvr[None, :] < DV), other=0.0)
        dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
        dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, dtype=tl.float32)
        first_q = k0 - shift  # earliest query (own coordinates) that can see a key of this tile
        for g in range(0, G):
            head = hk * G + g
            hs = head // HSEL_DIV
            cell = (seq * HSEL + hs) * NKB + kb
            lo = tl.load(QOFF + cell)
            hi = tl.load(QOFF + cell + 1)
            q_base = Q + head * stride_qh
            do_base = DO + head * stride_doh
            l_base = head.to(tl.int64) * stride_lh
            if Q_GATHER:
                n_entries = (hi - lo) * q_block
                for e0 in range(0, n_entries, BLOCK_M):
                    e = e0 + tl.arange(0, BLOCK_M)
                    qb = tl.load(QLIST + lo + e // q_block, mask=e < n_entries, other=-1)
                    tok = qb * q_block + e % q_block
                    row_valid = (qb >= 0) & (tok < len_q)
                    dk, dv = _bwd_dkdv_step(k, v, dk, dv, tok, row_valid, kn, kvalid, shift, q_start, q_base,
                                            do_base, LSE, DELTA, l_base, stride_qt, stride_dot, qk_scale,
                                            BLOCK_D, BLOCK_DV, D, DV, CAUSAL, DOT_PREC)
            else:
                for e in range(lo, hi):
                    qb = tl.load(QLIST + e)
                    qs = qb * q_block
                    qe = tl.minimum(qs + q_block, len_q)
                    if CAUSAL:
                        qs = tl.maximum(qs, first_q)
                    for i in range(qs, qe, BLOCK_M):
                        tok = i + tl.arange(0, BLOCK_M)
                        row_valid = tok < qe
                        dk, dv = _bwd_dkdv_step(k, v, dk, dv, tok, row_valid, kn, kvalid, shift, q_start, q_base,
                                                do_base, LSE, DELTA, l_base, stride_qt, stride_dot, qk_scale,
                                                BLOCK_D, BLOCK_DV, D, DV, CAUSAL, DOT_PREC)
        tl.store(DK_PTR + kn64[:, None] * stride_dkt + hk * stride_dkh + d[None, :],
                 (dk * sm_scale).to(DK_PTR.dtype.element_ty), mask=kvalid[:, None] & (d[None, :] < D))
        tl.store(DV_PTR + kn64[:, None] * stride_dvt + hk * stride_dvh + dvr[None, :],
                 dv.to(DV_PTR.dtype.element_ty), mask=kvalid[:, None] & (dvr[None, :] < DV))


@triton.jit
def _bwd_dkdv_step(k, v, dk, dv, tok, row_valid, kn, kvalid, shift, q_start, q_base, do_base, LSE, DELTA, l_base,
                   stride_qt, stride_dot, qk_scale,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                   CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """Transposed tile: keys are rows. sT [BLOCK_N, BLOCK_M] = k q^T."""
    tok64 = (q_start + tok).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dvr = tl.arange(0, BLOCK_DV)
    qT = tl.load(q_base + tok64[None, :] * stride_qt + d[:, None],
                 mask=row_valid[None, :] & (d[:, None] < D), other=0.0)
    do = tl.load(do_base + tok64[:, None] * stride_dot + dvr[None, :],
                 mask=row_valid[:, None] & (dvr[None, :] < DV), other=0.0)
    lse = tl.load(LSE + l_base + tok64, mask=row_valid, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + l_base + tok64, mask=row_valid, other=0.0)
    sT = mm(k, qT, DOT_PREC) * qk_scale
    vis = kvalid[:, None] & row_valid[None, :]
    if CAUSAL:
        vis = vis & (kn[:, None] <= (tok + shift)[None, :])
    pT = tl.where(vis, tl.math.exp2(sT - lse2[None, :]), 0.0)
    dv += mm(pT.to(do.dtype), do, DOT_PREC)
    dpT = mm(v, tl.trans(do), DOT_PREC)
    dsT = pT * (dpT - delta[None, :])
    dk += mm(dsT.to(qT.dtype), tl.trans(qT), DOT_PREC)
    return dk, dv
