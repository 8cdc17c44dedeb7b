"""Key-major Triton kernels for per-token, per-head selections (MoBA: `q_block == 1`, `Hsel == Hq`).

The query-major token mode of `querymajor` puts one token and the query heads sharing its
selection row in a tile; when few heads share a row (MoBA's `Hsel == Hq`: one) most of the 16-row
tensor-core tile is padding. Here the work is turned around: a program owns one tile of keys
(a selected key block, or a `BLOCK_N` slice of it) of one KV head and walks the selection entries
that list that block, `BLOCK_M` gathered (token, query head) rows at a time, over all the query
heads of the KV group. Every tile is full whatever the head layout.

Entry list (`build_entries`, torch ops on the selection's device, no host sync). The selection is
taken per token and per query head in token-major order, `sel [N, Tpad, Hq, S]` (MoBA's
`indices [N, Hq, Tq, S]` transposed; other layouts are first expanded with the head map and
`q_block`), and every entry is keyed by its cell `(sequence n, KV head, key block)`; entries that
can see no key (-1, a block past the sequence's keys, a token past the sequence's queries, a block
wholly in the causal future) get a sentinel key. One stable sort gives `order` (flat positions
`((n * Tpad + t) * Hq + h) * S + r` into `sel`, so token, head and rank are recoverable and
per-entry results live in a tensor shaped like `sel`; grouped by cell, within a cell by token then
head, so a step's gathered rows are mostly the contiguous heads of a few tokens) and
`searchsorted` the CSR offsets `off [cells + 1]`. A cell's list is cut into
chunks of at most `ENTRY_CHUNK` entries, one program each (`wcell` maps a program to its cell, the
grid is the bound `cdiv(entries, ENTRY_CHUNK) + cells`; programs past the real count exit at
once), so the early key blocks that every later query may select are spread over many programs.

Forward, two passes, memory O(T * Hq * D) (no per-entry output rows):
  a. `_fwd_lse_kernel`: per entry and key tile, the logsumexp of its scores (natural log, fp32,
     `-inf` when no key is visible) into `lse_e [N, Tpad, Hq, S, n_sub]` (`n_sub` key tiles per
     block when `k_block` exceeds the tile);
  b. torch: `lse` of a (token, head) row = logsumexp over its entries (an empty row: `-inf`);
  c. `_fwd_out_kernel`: the same traversal, `P = exp(S - lse)` (already normalized), `P @ V`
     added with float32 atomics into `out [Tq, Hq, Dv]`, cast to the input dtype at the end (an
     empty row stays 0).
Backward, `_bwd_kernel`: the same traversal computes `dS = P * (dP - delta)` per chunk; dK and dV
of the key tile are summed in registers and added once per program, dQ rows (`dS @ K * scale`) are
added per step, all with float32 atomics; `delta = rowsum(dO * O) - dlse` carries the lse gradient
exactly as in the query-major kernels.

Used by `kernels.sparse` when `uses_keymajor(...)`: token mode (`q_block % 16 != 0`), contiguous
key blocks (`k_block >= 16`) and fewer than 8 query heads per selection row and KV head
(`heads_per_tile < 8`). `ATTNKIT_SPARSE_KEYMAJOR=0` in the environment turns the path off (the
query-major token mode runs instead; for A/B timing). Atomics make the float32 sums
order-nondeterministic (run to run differences at float32 rounding level).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ... import config
from ..jit import LOG2E, max_combine, mm, pow2, sum_combine
from .plan import heads_per_tile, hsel_divisor
from .querymajor import _key_tile

# launch knobs (module attributes so tests can shrink them to exercise chunking and key sub-tiles)
ENTRY_CHUNK = 1024  # entries of one cell per program (a multiple of the BLOCK_M values below)
FWD_BLOCK_M = 128
BWD_BLOCK_M = 64
FWD_WARPS = 0  # 0: 8 when the key tile is 128 wide, else 4
BWD_WARPS = 0  # 0: 8 when D or Dv > 64, else 4
FWD_MAX_BLOCK_N = 128
BWD_MAX_BLOCK_N = 64

# calls that took this path (tests read it)
STATS = {"fwd": 0, "bwd": 0}


def uses_keymajor(hq: int, hkv: int, hsel: int, q_block: int, k_block: int) -> bool:
    """Whether `kernels.sparse` runs this call key-major (see the module docstring)."""
    if not config.get().sparse_keymajor:
        return False
    return q_block % 16 != 0 and k_block >= 16 and heads_per_tile(hq, hkv, hsel) < 8


# --- the entry list ---------------------------------------------------------------------------------


class Entries(NamedTuple):
    order: torch.Tensor  # [E] int32/int64: flat positions into sel [N, Tpad, Hq, S], grouped by cell
    off: torch.Tensor  # [cells + 1] int64: CSR offsets into `order`
    woff: torch.Tensor  # [cells + 1] int64: first program (work item) of each cell
    wcell: torch.Tensor  # [W] int32: cell of each program (== cells: no work)
    cells: int
    nkb: int
    tpad: int
    s: int
    chunk: int


def build_entries(indices: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, hq: int, hkv: int, q_block: int,
                  k_block: int, nkb: int, causal: bool, chunk: int, n_sub: int) -> Entries:
    """CSR of the selection entries per (sequence, KV head, key block) cell (module docstring)."""
    n, hsel, nq, s = indices.shape
    dev = indices.device
    sel = indices
    if hsel != hq:
        hmap = torch.arange(hq, device=dev) // hsel_divisor(hq, hkv, hsel)
        sel = sel.index_select(1, hmap)
    if q_block != 1:
        sel = sel.repeat_interleave(q_block, dim=2)
    sel = sel.to(torch.int32).permute(0, 2, 1, 3).contiguous()  # token-major [N, Tpad, Hq, S]
    tpad = sel.shape[1]
    g = hq // hkv
    cells = n * hkv * nkb
    lq = (cu_q[1:] - cu_q[:-1]).to(torch.int32).view(n, 1, 1, 1)
    lk = (cu_k[1:] - cu_k[:-1]).to(torch.int32).view(n, 1, 1, 1)
    t = torch.arange(tpad, device=dev, dtype=torch.int32).view(1, tpad, 1, 1)
    first_key = sel * k_block
    valid = (sel >= 0) & (sel < nkb) & (t < lq) & (first_key < lk)
    if causal:
        valid &= first_key <= t + (lk - lq)
    del first_key
    base = ((torch.arange(n, device=dev, dtype=torch.int32).view(n, 1) * hkv
             + torch.arange(hq, device=dev, dtype=torch.int32).view(1, hq) // g) * nkb).view(n, 1, hq, 1)
    key = torch.where(valid, base + sel, cells).view(-1)
    del valid
    keys, perm = torch.sort(key, stable=True)
    del key
    total = perm.numel()
    # positions (and lse_e offsets, `pos * n_sub + sub`) fit int32 for all but huge selections
    order = perm.to(torch.int32) if total * n_sub < 2**31 else perm
    del perm
    off = torch.searchsorted(keys, torch.arange(cells + 1, device=dev, dtype=torch.int32))
    del keys
    counts = off[1:] - off[:-1]
    nchunk = (counts + chunk - 1) // chunk
    woff = torch.zeros(cells + 1, dtype=torch.int64, device=dev)
    woff[1:] = torch.cumsum(nchunk, 0)
    w_max = triton.cdiv(total, chunk) + cells  # >= sum(nchunk): a host-side bound, no sync
    wcell = torch.searchsorted(woff[1:], torch.arange(w_max, device=dev, dtype=torch.int64), right=True)
    if order.numel() == 0:
        order = torch.zeros(1, dtype=torch.int32, device=dev)
    return Entries(order, off, woff, wcell.to(torch.int32), cells, nkb, tpad, s, chunk)


# --- kernels --------------------------------------------------------------------------------------


@triton.jit
def _cell_setup(w, WCELL, OFF, WOFF, CU_Q, CU_K, CELLS, NKB, HKV, k_block, CHUNK: tl.constexpr):
    """Program -> its cell's coordinates and entry range [lo, hi). A program past the work list
    (`cell == CELLS`) reads the last cell's data (in bounds) and must do nothing."""
    cell = tl.minimum(tl.load(WCELL + w), CELLS - 1)
    kb = cell % NKB
    nh = cell // NKB
    hk = nh % HKV
    seq = nh // HKV
    lo = tl.load(OFF + cell) + (w - tl.load(WOFF + cell)) * CHUNK
    hi = tl.minimum(lo + CHUNK, tl.load(OFF + cell + 1))
    q_start = tl.load(CU_Q + seq)
    len_q = tl.load(CU_Q + seq + 1) - q_start
    k_start = tl.load(CU_K + seq)
    len_k = tl.load(CU_K + seq + 1) - k_start
    return cell, kb, hk, lo, hi, q_start, len_q, k_start, len_k


@triton.jit
def _entry_rows(ORDER, e0, hi, q_start, S, TPAD, HQ, BLOCK_M: tl.constexpr):
    """The BLOCK_M entries from e0: flat position, token (own coordinates), query head, packed row."""
    e = e0 + tl.arange(0, BLOCK_M)
    ev = e < hi
    pos = tl.load(ORDER + e, mask=ev, other=0)
    row = pos // S
    head = row % HQ
    tq = (row // HQ) % TPAD
    tok64 = (q_start + tq).to(tl.int64)
    return ev, pos, tq, head, tok64


@triton.jit
def _key_range(w, sub, WCELL, OFF, WOFF, CU_Q, CU_K, CELLS, NKB, HKV, k_block, BLOCK_N: tl.constexpr,
               CHUNK: tl.constexpr):
    """A program's cell and key tile: (has work, KV head, entry range lo..hi, query start, key
    positions kn of the tile and their validity, absolute key rows, query-to-key shift)."""
    cell, kb, hk, lo, hi, q_start, len_q, k_start, len_k = _cell_setup(w, WCELL, OFF, WOFF, CU_Q, CU_K, CELLS, NKB,
                                                                       HKV, k_block, CHUNK)
    k0 = kb * k_block + sub * BLOCK_N
    kstop = tl.minimum(kb * k_block + k_block, len_k)
    work = (tl.load(WCELL + w) < CELLS) & (k0 < kstop)
    kn = k0 + tl.arange(0, BLOCK_N)
    return work, hk, lo, hi, q_start, kn, kn < kstop, (k_start + kn).to(tl.int64), len_k - len_q


@triton.jit
def _gather_rows(X, tok64, head, ev, stride_t, stride_h, BLOCK: tl.constexpr, DIM: tl.constexpr):
    """Rows `X[tok, head, :DIM]` of the entries (zeros where `ev` is False): [BLOCK_M, BLOCK]."""
    c = tl.arange(0, BLOCK)
    return tl.load(X + tok64[:, None] * stride_t + head[:, None] * stride_h + c[None, :],
                   mask=ev[:, None] & (c[None, :] < DIM), other=0.0)


@triton.jit
def _entry_visible(ev, kvalid, kn, tq, shift, CAUSAL: tl.constexpr):
    vis = ev[:, None] & kvalid[None, :]
    if CAUSAL:
        vis = vis & (kn[None, :] <= (tq + shift)[:, None])
    return vis


@triton.jit
def _lse_base2(LSE, lrow, ev):
    """The rows' LSE in base 2, `+inf` for a row without keys (so `exp2(s - lse)` is 0 there)."""
    lse = tl.load(LSE + lrow, mask=ev, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _lse_item(Q, kT, LSE_E, ORDER, lo, hi, q_start, kn, kvalid, shift, sub, stride_qt, stride_qh, HQ, TPAD, S, N_SUB,
              qk_scale, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """Pass a over one work item (entries lo..hi of a cell, key tile kT [BLOCK_D, BLOCK_N]): each
    entry's logsumexp over the tile into `LSE_E[pos * N_SUB + sub]`."""
    for e0 in range(lo, hi, BLOCK_M):
        ev, pos, tq, head, tok64 = _entry_rows(ORDER, e0, hi, q_start, S, TPAD, HQ, BLOCK_M)
        q = _gather_rows(Q, tok64, head, ev, stride_qt, stride_qh, BLOCK_D, D)
        s = mm(q, kT, DOT_PREC) * qk_scale
        s = tl.where(_entry_visible(ev, kvalid, kn, tq, shift, CAUSAL), s, float("-inf"))
        m = tl.reduce(s, 1, max_combine)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l = tl.reduce(tl.math.exp2(s - m_safe[:, None]), 1, sum_combine)
        empty = l == 0.0
        lse = tl.where(empty, float("-inf"), (m_safe + tl.math.log2(tl.where(empty, 1.0, l))) * 0.6931471805599453)
        tl.store(LSE_E + pos * N_SUB + sub, lse, mask=ev)


@triton.jit
def _out_item(Q, kT, v, OACC, LSE, ORDER, lo, hi, q_start, kn, kvalid, shift, stride_qt, stride_qh, stride_ot,
              stride_oh, stride_lh, HQ, TPAD, S, qk_scale, D: tl.constexpr, DV: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
              DOT_PREC: tl.constexpr, ATOMIC: tl.constexpr):
    """Pass c over one work item: `exp(S - lse) @ V` added with float32 atomics into OACC rows
    (`ATOMIC=False`: plain stores, wrong sums; only the profile benchmark uses it, to time the atomics)."""
    dvr = tl.arange(0, BLOCK_DV)
    for e0 in range(lo, hi, BLOCK_M):
        ev, pos, tq, head, tok64 = _entry_rows(ORDER, e0, hi, q_start, S, TPAD, HQ, BLOCK_M)
        q = _gather_rows(Q, tok64, head, ev, stride_qt, stride_qh, BLOCK_D, D)
        lse2 = _lse_base2(LSE, head.to(tl.int64) * stride_lh + tok64, ev)
        s = mm(q, kT, DOT_PREC) * qk_scale
        vis = _entry_visible(ev, kvalid, kn, tq, shift, CAUSAL)
        p = tl.where(vis, tl.math.exp2(s - lse2[:, None]), 0.0)
        o = mm(p.to(v.dtype), v, DOT_PREC)
        optr = OACC + tok64[:, None] * stride_ot + head[:, None] * stride_oh + dvr[None, :]
        if ATOMIC:
            tl.atomic_add(optr, o, mask=ev[:, None] & (dvr[None, :] < DV), sem="relaxed")
        else:
            tl.store(optr, o, mask=ev[:, None] & (dvr[None, :] < DV))


@triton.jit
def _bwd_item(Q, K, V, DO, DQ, DK_PTR, DV_PTR, LSE, DELTA, ORDER, hk, lo, hi, q_start, kn, kvalid, kn64, shift,
              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
              stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
              HQ, TPAD, S, qk_scale, sm_scale,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """Backward over one work item: dK / dV of the key tile summed over the item's entries and added
    once; dQ rows (`dS @ K * scale`) added per step; all float32 atomics."""
    d = tl.arange(0, BLOCK_D)
    dvr = tl.arange(0, BLOCK_DV)
    k = tl.load(K + kn64[:, None] * stride_kt + hk * stride_kh + d[None, :],
                mask=kvalid[:, None] & (d[None, :] < D), other=0.0)
    v = tl.load(V + kn64[:, None] * stride_vt + hk * stride_vh + dvr[None, :],
                mask=kvalid[:, None] & (dvr[None, :] < DV), other=0.0)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, dtype=tl.float32)
    for e0 in range(lo, hi, BLOCK_M):
        ev, pos, tq, head, tok64 = _entry_rows(ORDER, e0, hi, q_start, S, TPAD, HQ, BLOCK_M)
        q = _gather_rows(Q, tok64, head, ev, stride_qt, stride_qh, BLOCK_D, D)
        do = _gather_rows(DO, tok64, head, ev, stride_dot, stride_doh, BLOCK_DV, DV)
        lrow = head.to(tl.int64) * stride_lh + tok64
        lse2 = _lse_base2(LSE, lrow, ev)
        delta = tl.load(DELTA + lrow, mask=ev, other=0.0)
        s = mm(q, tl.trans(k), DOT_PREC) * qk_scale
        vis = _entry_visible(ev, kvalid, kn, tq, shift, CAUSAL)
        p = tl.where(vis, tl.math.exp2(s - lse2[:, None]), 0.0)
        dv += mm(tl.trans(p.to(do.dtype)), do, DOT_PREC)
        dp = mm(do, tl.trans(v), DOT_PREC)
        ds = p * (dp - delta[:, None])
        dk += mm(tl.trans(ds.to(q.dtype)), q, DOT_PREC)
        dq = mm(ds.to(k.dtype), k, DOT_PREC) * sm_scale
        tl.atomic_add(DQ + tok64[:, None] * stride_dqt + head[:, None] * stride_dqh + d[None, :], dq,
                      mask=ev[:, None] & (d[None, :] < D), sem="relaxed")
    tl.atomic_add(DK_PTR + kn64[:, None] * stride_dkt + hk * stride_dkh + d[None, :], dk * sm_scale,
                  mask=kvalid[:, None] & (d[None, :] < D), sem="relaxed")
    tl.atomic_add(DV_PTR + kn64[:, None] * stride_dvt + hk * stride_dvh + dvr[None, :], dv,
                  mask=kvalid[:, None] & (dvr[None, :] < DV), sem="relaxed")


@triton.jit
def _fwd_lse_kernel(
    Q, K, ORDER, OFF, WOFF, WCELL, LSE_E, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh,
    CELLS, NKB, HKV, HQ, TPAD, S, N_SUB, k_block, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
):
    sub = tl.program_id(1)
    work, hk, lo, hi, q_start, kn, kvalid, kn64, shift = _key_range(tl.program_id(0), sub, WCELL, OFF, WOFF, CU_Q,
                                                                    CU_K, CELLS, NKB, HKV, k_block, BLOCK_N, CHUNK)
    if work:
        d = tl.arange(0, BLOCK_D)
        kT = tl.load(K + kn64[None, :] * stride_kt + hk * stride_kh + d[:, None],
                     mask=kvalid[None, :] & (d[:, None] < D), other=0.0)
        _lse_item(Q, kT, LSE_E, ORDER, lo, hi, q_start, kn, kvalid, shift, sub, stride_qt, stride_qh, HQ, TPAD, S,
                  N_SUB, qk_scale, D, BLOCK_D, BLOCK_M, CAUSAL, DOT_PREC)


@triton.jit
def _fwd_out_kernel(
    Q, K, V, OACC, LSE, ORDER, OFF, WOFF, WCELL, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    CELLS, NKB, HKV, HQ, TPAD, S, k_block, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr, ATOMIC: tl.constexpr,
):
    sub = tl.program_id(1)
    work, hk, lo, hi, q_start, kn, kvalid, kn64, shift = _key_range(tl.program_id(0), sub, WCELL, OFF, WOFF, CU_Q,
                                                                    CU_K, CELLS, NKB, HKV, k_block, BLOCK_N, CHUNK)
    if work:
        kT, v = _key_tile(kn64, kvalid, K + hk * stride_kh, V + hk * stride_vh, stride_kt, stride_vt,
                          BLOCK_D, BLOCK_DV, D, DV)
        _out_item(Q, kT, v, OACC, LSE, ORDER, lo, hi, q_start, kn, kvalid, shift, stride_qt, stride_qh, stride_ot,
                  stride_oh, stride_lh, HQ, TPAD, S, qk_scale, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, CAUSAL, DOT_PREC,
                  ATOMIC)


@triton.jit
def _bwd_kernel(
    Q, K, V, DO, DQ, DK_PTR, DV_PTR, LSE, DELTA, ORDER, OFF, WOFF, WCELL, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
    CELLS, NKB, HKV, HQ, TPAD, S, k_block, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One program: a key tile of one KV head and a chunk of the entries that selected its block."""
    sub = tl.program_id(1)
    work, hk, lo, hi, q_start, kn, kvalid, kn64, shift = _key_range(tl.program_id(0), sub, WCELL, OFF, WOFF, CU_Q,
                                                                    CU_K, CELLS, NKB, HKV, k_block, BLOCK_N, CHUNK)
    if work:
        _bwd_item(Q, K, V, DO, DQ, DK_PTR, DV_PTR, LSE, DELTA, ORDER, hk, lo, hi, q_start, kn, kvalid, kn64, shift,
                  stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                  stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
                  HQ, TPAD, S, qk_scale, sm_scale, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, CAUSAL, DOT_PREC)


# --- launchers ------------------------------------------------------------------------------------


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently run in tf32 (the 2x rule compares with plain fp32 PyTorch)
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_n(k_block: int, cap: int) -> int:
    return min(max(16, pow2(k_block)), cap)


def _pack_lse(lse_row: torch.Tensor, cu_q: torch.Tensor, tq_total: int) -> torch.Tensor:
    """[N, Tpad, Hq] per-sequence rows -> packed [Hq, Tq_total] (token i of sequence n at cu_q[n] + i)."""
    dev = lse_row.device
    i = torch.arange(tq_total, device=dev, dtype=torch.int32)
    seq = torch.searchsorted(cu_q[1:].contiguous(), i, right=True)
    t = i.long() - cu_q.long()[seq]
    tpad = lse_row.shape[1]
    got = lse_row[seq, t.clamp_max(max(tpad - 1, 0))]  # [Tq_total, Hq]
    got = torch.where((t < tpad).view(-1, 1), got, float("-inf"))
    return got.t().contiguous()


Phases = list  # [(name, step)]: each step reads and extends a state dict


def run_phases(phases: Phases) -> dict:
    """Run the steps of `forward_phases` / `backward_phases` in order; the final state."""
    st: dict = {}
    for _, step in phases:
        step(st)
    return st


def forward_phases(q, k, v, indices, cu_q, cu_k, max_q, max_k, q_block, k_block, causal, scale,
                   out_atomic: bool = True) -> Phases:
    """The packed key-major forward as named steps (`entries`, `pass_a`, `lse_reduce`, `pass_c`,
    `cast`), so the profile benchmark can time each; every step allocates what it writes, so a step
    can be re-run on the same state. `out_atomic=False` (the profile's diagnostic only) makes pass c
    store instead of add: wrong outputs, the time of pass c without its atomics."""
    tq, hq, d = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    n = indices.shape[0]
    dev = q.device
    nkb = triton.cdiv(max(max_k, 1), k_block)
    bn = _block_n(k_block, FWD_MAX_BLOCK_N)
    n_sub = triton.cdiv(k_block, bn)
    chunk = max(FWD_BLOCK_M, ENTRY_CHUNK // FWD_BLOCK_M * FWD_BLOCK_M)
    bd, bdv = max(16, pow2(d)), max(16, pow2(dv))
    warps = FWD_WARPS or (8 if bn >= 128 else 4)
    prec = _prec(q.dtype)

    def entries(st):
        st["ent"] = build_entries(indices, cu_q, cu_k, hq, hkv, q_block, k_block, nkb, causal, chunk, n_sub)

    def pass_a(st):
        ent = st["ent"]
        lse_e = torch.full((n * hq * ent.tpad * ent.s * n_sub,), float("-inf"), dtype=torch.float32, device=dev)
        if lse_e.numel():
            _fwd_lse_kernel[(ent.wcell.numel(), n_sub)](
                q, k, ent.order, ent.off, ent.woff, ent.wcell, lse_e, cu_q, cu_k,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                ent.cells, nkb, hkv, hq, ent.tpad, ent.s, n_sub, k_block, scale * LOG2E,
                D=d, BLOCK_D=bd, BLOCK_M=FWD_BLOCK_M, BLOCK_N=bn, CHUNK=ent.chunk, CAUSAL=causal, DOT_PREC=prec,
                num_warps=warps, num_stages=2,
            )
        st["lse_e"] = lse_e

    def lse_reduce(st):
        st["lse"] = reduce_lse(st["lse_e"], n, st["ent"].tpad, hq, st["ent"].s * n_sub, cu_q, tq)

    def pass_c(st):
        ent = st["ent"]
        oacc = torch.zeros(tq, hq, dv, dtype=torch.float32, device=dev)
        if ent.order.numel() and ent.s:
            lse = st["lse"]
            _fwd_out_kernel[(ent.wcell.numel(), n_sub)](
                q, k, v, oacc, lse, ent.order, ent.off, ent.woff, ent.wcell, cu_q, cu_k,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                oacc.stride(0), oacc.stride(1), lse.stride(0),
                ent.cells, nkb, hkv, hq, ent.tpad, ent.s, k_block, scale * LOG2E,
                D=d, DV=dv, BLOCK_D=bd, BLOCK_DV=bdv, BLOCK_M=FWD_BLOCK_M, BLOCK_N=bn, CHUNK=ent.chunk,
                CAUSAL=causal, DOT_PREC=prec, ATOMIC=out_atomic, num_warps=warps, num_stages=2,
            )
        st["oacc"] = oacc

    def cast(st):
        st["out"] = st["oacc"] if q.dtype == torch.float32 else st["oacc"].to(q.dtype)

    return [("entries", entries), ("pass_a", pass_a), ("lse_reduce", lse_reduce), ("pass_c", pass_c),
            ("cast", cast)]


def reduce_lse(lse_e: torch.Tensor, n: int, tpad: int, hq: int, width: int, cu_q: torch.Tensor,
               tq: int) -> torch.Tensor:
    """Per-entry LSE `[N * Tpad * Hq * width]` (width = S * n_sub) -> row LSE, packed `[Hq, Tq]`."""
    lse_row = torch.logsumexp(lse_e.view(n, tpad, hq, width), -1)  # all -inf (or width 0): -inf
    return _pack_lse(lse_row, cu_q, tq)


def forward(q, k, v, indices, cu_q, cu_k, max_q, max_k, q_block, k_block, causal, scale):
    """Packed key-major forward: q [Tq, Hq, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv] -> (out, lse [Hq, Tq])."""
    STATS["fwd"] += 1
    st = run_phases(forward_phases(q, k, v, indices, cu_q, cu_k, max_q, max_k, q_block, k_block, causal, scale))
    return st["out"], st["lse"]


def backward_phases(do, q, k, v, lse, delta, indices, cu_q, cu_k, max_q, max_k, q_block, k_block, causal,
                    scale) -> Phases:
    """The packed key-major backward as named steps (`entries`, `bwd_kernel`, `cast`)."""
    tq, hq, d = q.shape
    tk, hkv, dv = v.shape
    dev = q.device
    nkb = triton.cdiv(max(max_k, 1), k_block)
    bn = _block_n(k_block, BWD_MAX_BLOCK_N)
    n_sub = triton.cdiv(k_block, bn)
    big = max(d, dv) > 64
    bm = BWD_BLOCK_M
    warps = BWD_WARPS or (8 if big else 4)
    chunk = max(bm, ENTRY_CHUNK // bm * bm)

    def entries(st):
        st["ent"] = build_entries(indices, cu_q, cu_k, hq, hkv, q_block, k_block, nkb, causal, chunk, n_sub)

    def bwd_kernel(st):
        ent = st["ent"]
        dq = torch.zeros(tq, hq, d, dtype=torch.float32, device=dev)
        dk = torch.zeros(tk, hkv, d, dtype=torch.float32, device=dev)
        dvv = torch.zeros(tk, hkv, dv, dtype=torch.float32, device=dev)
        if ent.order.numel() and ent.s:
            _bwd_kernel[(ent.wcell.numel(), n_sub)](
                q, k, v, do, dq, dk, dvv, lse, delta, ent.order, ent.off, ent.woff, ent.wcell, cu_q, cu_k,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1),
                dvv.stride(0), dvv.stride(1), lse.stride(0),
                ent.cells, nkb, hkv, hq, ent.tpad, ent.s, k_block, scale * LOG2E, scale,
                D=d, DV=dv, BLOCK_D=max(16, pow2(d)), BLOCK_DV=max(16, pow2(dv)), BLOCK_M=bm, BLOCK_N=bn,
                CHUNK=ent.chunk, CAUSAL=causal, DOT_PREC=_prec(q.dtype), num_warps=warps, num_stages=2,
            )
        st["grads32"] = (dq, dk, dvv)

    def cast(st):
        st["grads"] = cast_grads(st["grads32"], q)

    return [("entries", entries), ("bwd_kernel", bwd_kernel), ("cast", cast)]


def cast_grads(grads32: tuple, q: torch.Tensor) -> tuple:
    """float32 (dq, dk, dv) -> the inputs' dtype."""
    return grads32 if q.dtype == torch.float32 else tuple(g.to(q.dtype) for g in grads32)


def backward(do, q, k, v, lse, delta, indices, cu_q, cu_k, max_q, max_k, q_block, k_block, causal, scale):
    """Packed key-major backward (`delta = rowsum(dO * O) - dlse`, `[Hq, Tq]`): (dq, dk, dv)."""
    STATS["bwd"] += 1
    return run_phases(backward_phases(do, q, k, v, lse, delta, indices, cu_q, cu_k, max_q, max_k, q_block, k_block,
                                      causal, scale))["grads"]


__all__ = ["uses_keymajor", "build_entries", "forward", "backward", "forward_phases", "backward_phases",
           "run_phases", "STATS", "ENTRY_CHUNK"]
