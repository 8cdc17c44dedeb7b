"""One-pass forward of the windowed key-major executor: a cheap per-row score bound replaces pass a.

`keymajor_windowed` computes every entry's scores twice (pass a for the row LSE, pass c for
`exp(S - lse) @ V`), because float32 atomics can only sum contributions that share one reference.
Here the reference is a bound known before any score: for a row (token, query head) with query
`q` and selected blocks `b`, every visible score satisfies `s <= |q| * max_{k in b} |k| * scale`
(Cauchy-Schwarz), so `m_ref = max_b |q| * kmax_b * scale` (base 2) is at least the row's maximum.
It costs one norm per key block (`_block_norm_kernel`) and one norm and S loads per row
(`_row_bound_kernel`), instead of a second sweep of Q gathers and QK^T products.

Single pass (`_onepass_kernel`, the windowed work list and persistent programs): per entry and key
tile, `m_t = max s`, `p = exp2(s - m_t)` (so P keeps its precision in the half-precision product),
`c = exp2(m_t - m_ref)`; `c * (p @ V)` and `c * rowsum(p)` are added with float32 atomics into
`oacc` and `l`. Then `out = oacc / l`, `lse = (m_ref + log2 l) * ln 2`.

Exactness: `c <= 1` (up to rounding), so nothing overflows. A contribution vanishes only when its
`m_t` lies more than 126 below `m_ref` (float32 underflow). A row is safe when `l >= 2^-86 * S *
k_block` (then its largest contribution has `c >= 2^-86`, and anything lost is below 2^-40 of
it); when some row is not (the bound is loose by more than ~86 bits: very large norms), the call
is recomputed by the two-pass `keymajor_windowed.forward` (one host sync per call to decide).
The rounding of `m_t - m_ref` in float32 perturbs each contribution by about `|m_ref| * 2^-24`
relative: below half precision, not below float32's, so float32 inputs (and calls made during
CUDA graph capture, where the check cannot sync) take the two-pass forward. The backward is
`keymajor_windowed`'s (it reads the LSE).

Chosen by the `sparse_keymajor_variant = "onepass"` setting (`config.py`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..jit import LN2, LOG2E, max_combine, mm, pow2, sum_combine
from . import keymajor_windowed as windowed
from .keymajor import Phases, _block_n, _entry_rows, _entry_visible, _gather_rows, _pack_lse, run_phases
from .keymajor_windowed import _item, _programs, build_entries
from .plan import hsel_divisor
from .querymajor import _key_tile

NORM_ROWS = 64  # key rows per step of the block-norm kernel
BOUND_ROWS = 64  # (token, head) rows per program of the row-bound kernel
SAFE_LOG2 = -86.0  # a row is exact when log2(l) >= this + log2(S * k_block) (module docstring)

STATS = {"fwd": 0, "fallback": 0}


@triton.jit
def _block_norm_kernel(K, KN, CU_K, stride_kt, stride_kh, NKB, HKV, k_block, D: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program (sequence * NKB + block, KV head): the largest key norm of the block -> KN."""
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    n = pid // NKB
    kb = pid % NKB
    k_start = tl.load(CU_K + n)
    len_k = tl.load(CU_K + n + 1) - k_start
    stop = tl.minimum(kb * k_block + k_block, len_k)
    d = tl.arange(0, BLOCK_D)
    best = tl.full([BLOCK_R], 0.0, tl.float32)
    for r0 in range(kb * k_block, stop, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        x = tl.load(K + (k_start + r).to(tl.int64)[:, None] * stride_kt + hk * stride_kh + d[None, :],
                    mask=(r < stop)[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
        best = tl.maximum(best, tl.sqrt(tl.reduce(x * x, 1, sum_combine)))
    tl.store(KN + pid * HKV + hk, tl.reduce(best, 0, max_combine))


@triton.jit
def _row_bound_kernel(Q, IDX, KN, MREF, CU_Q, CU_K, stride_qt, stride_qh, stride_in, stride_ih, stride_iq,
                      NROWS, NSEQ, TPAD, HQ, S, DIV, G, HKV, NKB, q_block, k_block, qk_scale,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, CAUSAL: tl.constexpr):
    """Token-major rows `(n * TPAD + t) * HQ + h` -> `MREF`: the bound in base 2 over the row's valid
    entries (the rules of `keymajor_windowed._entry_cells`), `-inf` for a row without one."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rv = row < NROWS
    h = row % HQ
    tn = row // HQ
    t = tn % TPAD
    n = tl.minimum(tn // TPAD, NSEQ - 1)
    q_start = tl.load(CU_Q + n)
    len_q = tl.load(CU_Q + n + 1) - q_start
    len_k = tl.load(CU_K + n + 1) - tl.load(CU_K + n)
    tv = rv & (t < len_q)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + (q_start + t)[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :],
                mask=tv[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
    qn = tl.sqrt(tl.reduce(q * q, 1, sum_combine)) * qk_scale
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for r in range(0, S):
        blk = tl.load(IDX + n * stride_in + (h // DIV) * stride_ih + (t // q_block) * stride_iq + r, mask=tv,
                      other=-1)
        first = blk.to(tl.int64) * k_block
        valid = tv & (blk >= 0) & (blk < NKB) & (first < len_k)
        if CAUSAL:
            valid = valid & (first <= t + (len_k - len_q))
        kn = tl.load(KN + (n * NKB + tl.where(valid, blk, 0)) * HKV + h // G, mask=valid, other=0.0)
        m = tl.where(valid, tl.maximum(m, qn * kn), m)
    tl.store(MREF + row, m, mask=rv)


@triton.jit
def _onepass_item(Q, kT, v, OACC, LACC, MREF, ORDER, lo, hi, q_start, kn, kvalid, shift, stride_qt, stride_qh,
                  stride_ot, stride_oh, HQ, TPAD, S, qk_scale, D: tl.constexpr, DV: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """One work item: `c * (exp2(S - m_t) @ V)` and `c * rowsum` added into OACC and LACC rows."""
    dvr = tl.arange(0, BLOCK_DV)
    for e0 in range(lo, hi, BLOCK_M):
        ev, pos, tq, head, tok64 = _entry_rows(ORDER, e0, hi, q_start, S, TPAD, HQ, BLOCK_M)
        q = _gather_rows(Q, tok64, head, ev, stride_qt, stride_qh, BLOCK_D, D)
        row = pos // S
        mref = tl.load(MREF + row, mask=ev, other=0.0)
        vis = _entry_visible(ev, kvalid, kn, tq, shift, CAUSAL)
        s = tl.where(vis, mm(q, kT, DOT_PREC) * qk_scale, float("-inf"))
        mt = tl.reduce(s, 1, max_combine)
        empty = mt == float("-inf")
        mt_safe = tl.where(empty, 0.0, mt)
        p = tl.where(vis, tl.math.exp2(s - mt_safe[:, None]), 0.0)
        live = ev & (mt > float("-inf"))
        c = tl.where(live, tl.math.exp2(mt_safe - tl.where(live, mref, 0.0)), 0.0)
        o = mm(p.to(v.dtype), v, DOT_PREC) * c[:, None]
        tl.atomic_add(OACC + tok64[:, None] * stride_ot + head[:, None] * stride_oh + dvr[None, :], o,
                      mask=ev[:, None] & (dvr[None, :] < DV), sem="relaxed")
        tl.atomic_add(LACC + row, tl.reduce(p, 1, sum_combine) * c, mask=ev, sem="relaxed")


@triton.jit
def _onepass_kernel(
    Q, K, V, OACC, LACC, MREF, ORDER, OFF, WOFF, WCELL, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    CELLS, NSEQ, NKB, HKV, HQ, TPAD, S, k_block, qk_scale, NPROG,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    sub = tl.program_id(1)
    n_work = tl.load(WOFF + CELLS).to(tl.int32)
    for w in range(tl.program_id(0), n_work, NPROG):
        work, hk, lo, hi, q_start, kn, kvalid, kn64, shift = _item(w, sub, WCELL, OFF, WOFF, CU_Q, CU_K, NSEQ, NKB,
                                                                   HKV, k_block, BLOCK_N, CHUNK)
        if work:
            kT, v = _key_tile(kn64, kvalid, K + hk * stride_kh, V + hk * stride_vh, stride_kt, stride_vt,
                              BLOCK_D, BLOCK_DV, D, DV)
            _onepass_item(Q, kT, v, OACC, LACC, MREF, ORDER, lo, hi, q_start, kn, kvalid, shift, stride_qt,
                          stride_qh, stride_ot, stride_oh, HQ, TPAD, S, qk_scale, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M,
                          CAUSAL, DOT_PREC)


# --- launchers ------------------------------------------------------------------------------------


def serves(q: torch.Tensor) -> bool:
    """Whether the one-pass forward may run this call (half precision, not under graph capture)."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False
    return not (q.is_cuda and torch.cuda.is_current_stream_capturing())


def forward_phases(q, k, v, indices, cu_q, cu_k, max_q, max_k, q_block, k_block, causal, scale) -> Phases:
    """The packed one-pass forward as named steps (`entries`, `bounds`, `one_pass`, `finish`)."""
    tq, hq, d = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    n, hsel, nq, s = indices.shape
    dev = q.device
    nkb = triton.cdiv(max(max_k, 1), k_block)
    bn = _block_n(k_block, windowed.FWD_MAX_BLOCK_N)
    n_sub = triton.cdiv(k_block, bn)
    bm = windowed.FWD_BLOCK_M
    chunk = max(bm, windowed.ENTRY_CHUNK // bm * bm)
    bd, bdv = max(16, pow2(d)), max(16, pow2(dv))
    warps = 8 if bn >= 128 else 4
    window = windowed.WINDOW
    tpad = nq * q_block
    rows = n * tpad * hq
    idx = indices if indices.dtype == torch.int32 and indices.stride(-1) == 1 else indices.to(torch.int32).contiguous()

    def entries(st):
        st["ent"] = build_entries(idx, cu_q, cu_k, hq, hkv, q_block, k_block, nkb, causal, chunk, n_sub, window)

    def bounds(st):
        kn = torch.empty(n * nkb * hkv, dtype=torch.float32, device=dev)
        _block_norm_kernel[(n * nkb, hkv)](k, kn, cu_k, k.stride(0), k.stride(1), nkb, hkv, k_block, D=d, BLOCK_D=bd,
                                           BLOCK_R=NORM_ROWS)
        mref = torch.empty(max(rows, 1), dtype=torch.float32, device=dev)
        if rows:
            _row_bound_kernel[(triton.cdiv(rows, BOUND_ROWS),)](
                q, idx, kn, mref, cu_q, cu_k, q.stride(0), q.stride(1), idx.stride(0), idx.stride(1), idx.stride(2),
                rows, n, tpad, hq, s, hsel_divisor(hq, hkv, hsel), hq // hkv, hkv, nkb, q_block, k_block,
                scale * LOG2E, D=d, BLOCK_D=bd, BLOCK_R=BOUND_ROWS, CAUSAL=causal)
        st["mref"] = mref

    def one_pass(st):
        ent, mref = st["ent"], st["mref"]
        oacc = torch.zeros(tq, hq, dv, dtype=torch.float32, device=dev)
        lacc = torch.zeros(max(rows, 1), dtype=torch.float32, device=dev)
        if rows * s:
            nprog = _programs(dev, ent.wcell.numel())
            _onepass_kernel[(nprog, n_sub)](
                q, k, v, oacc, lacc, mref, ent.order, ent.off, ent.woff, ent.wcell, cu_q, cu_k,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                oacc.stride(0), oacc.stride(1),
                ent.cells, n, nkb, hkv, hq, tpad, s, k_block, scale * LOG2E, nprog,
                D=d, DV=dv, BLOCK_D=bd, BLOCK_DV=bdv, BLOCK_M=bm, BLOCK_N=bn, CHUNK=ent.chunk,
                CAUSAL=causal, DOT_PREC="tf32", num_warps=warps, num_stages=2,
            )
        st["oacc"], st["lacc"] = oacc, lacc

    def finish(st):
        mref = st["mref"][:rows].view(n, tpad, hq)
        l = st["lacc"][:rows].view(n, tpad, hq)
        has = torch.isfinite(mref)
        st["unsafe"] = has & (torch.log2(l) < SAFE_LOG2 + math.log2(max(s * k_block, 1)))
        lse_row = torch.where(has & (l > 0), (mref + torch.log2(l)) * LN2, float("-inf"))
        st["lse"] = _pack_lse(lse_row, cu_q, tq)  # [Hq, Tq]
        lp = _pack_lse(torch.where(has, l, 0.0), cu_q, tq).t().unsqueeze(-1)  # [Tq, Hq, 1], -inf: padding
        ok = lp > 0
        st["out"] = torch.where(ok, st["oacc"] / torch.where(ok, lp, 1.0), 0.0).to(q.dtype)

    return [("entries", entries), ("bounds", bounds), ("one_pass", one_pass), ("finish", finish)]


def forward(q, k, v, indices, cu_q, cu_k, max_q, max_k, q_block, k_block, causal, scale):
    """Packed forward: (out [Tq, Hq, Dv], lse [Hq, Tq]); the two-pass forward where this one may not
    run or a row's bound was too loose (module docstring)."""
    args = (q, k, v, indices, cu_q, cu_k, max_q, max_k, q_block, k_block, causal, scale)
    if serves(q):
        STATS["fwd"] += 1
        st = run_phases(forward_phases(*args))
        if not bool(st["unsafe"].any()):  # one host sync
            return st["out"], st["lse"]
        STATS["fallback"] += 1
    return windowed.forward(*args)


__all__ = ["forward", "forward_phases", "serves", "STATS"]
