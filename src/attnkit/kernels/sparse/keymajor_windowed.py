"""The key-major executor with token-windowed cells, counting-sort entry lists and persistent programs.

Same traversal and passes as `keymajor` (read its docstring first: a program takes a tile of keys
of one KV head and walks, `BLOCK_M` rows at a time, the (token, query head) entries that selected
that key block; pass a = per-entry LSE, torch logsumexp, pass c = `exp(S - lse) @ V` added with
float32 atomics; the backward adds dQ, dK, dV with float32 atomics), with three changes aimed at
memory traffic rather than arithmetic:

- Token windows. A cell is `(window, sequence, KV head, key block)`, windows of `WINDOW` query
  tokens outermost. The work list runs window by window, so the programs in flight at any moment
  gather Q rows and add into output (dQ) rows of one window: a window's Q (`WINDOW * G * D` half
  values per KV head) and its float32 accumulator rows are small enough to stay in L2 while the
  ~S cells each row selected are processed (in `keymajor` a cell spans the whole sequence, so a Q
  row is fetched once per selected block and the output rows touched at one time are spread over
  the whole tensor). The price: a key tile is loaded once per (window, block) instead of once per
  block, and the cells are `ceil(Tpad / WINDOW)` times as many.
- Counting sort. The entry list is built by two Triton passes over the selection, a histogram of
  cell counts (integer atomics) and a scatter that claims each entry's slot with an atomic
  fetch-add, plus a cumsum over the cells; no sort, no token-major copy of the selection. Order
  within a cell follows the atomics (roughly token order), so it is not deterministic; the float32
  sums were not deterministic either.
- Persistent programs. The work list (`woff`, `wcell`: a cell's entries in chunks of
  `ENTRY_CHUNK`) is sized on the device; a fixed grid of programs strides over it, reading the
  number of work items from `woff[cells]`, so there is no host sync and no empty program for the
  many windows x blocks cells that hold no entry (causally impossible ones, for instance).

`WINDOW = 0` puts the whole sequence in one window (`keymajor`'s cells, built by counting);
`BWD_WINDOW` is the backward's window, apart because its dK / dV atomics are per work item.
Chosen by the `sparse_keymajor_variant = "windowed"` setting (`config.py`); "sorted" by default.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..jit import LOG2E, pow2
from .keymajor import (Phases, _block_n, _bwd_item, _lse_item, _out_item, _prec, cast_grads, reduce_lse,
                       run_phases)
from .plan import hsel_divisor
from .querymajor import _key_tile

# launch knobs (module attributes: tests shrink them, the profile benchmark sweeps WINDOW)
WINDOW = 1024  # query tokens per window of the forward (0: one window per sequence)
BWD_WINDOW = 1024  # the same for the backward (its dK / dV atomics grow with the number of cells)
ENTRY_CHUNK = 1024  # entries of one cell per work item (a multiple of the BLOCK_M values below)
FWD_BLOCK_M = 128
BWD_BLOCK_M = 64
FWD_MAX_BLOCK_N = 128
BWD_MAX_BLOCK_N = 64
COUNT_BLOCK = 1024  # selection entries per program of the counting passes
PROGRAMS_PER_SM = 2  # persistent grid: this many programs per SM (GPU)
INTERPRETER_PROGRAMS = 3  # persistent grid under the CPU interpreter (several, to test the striding)

STATS = {"fwd": 0, "bwd": 0}


# --- the entry list by counting -------------------------------------------------------------------


@triton.jit
def _entry_cells(IDX, p, total, CU_Q, CU_K, stride_in, stride_ih, stride_iq, NSEQ, TPAD, HQ, S, DIV, G, HKV, NKB,
                 q_block, k_block, WINDOW, CAUSAL: tl.constexpr):
    """Flat token-major positions `p = ((n * TPAD + t) * HQ + h) * S + r` -> (valid, cell). An entry
    is valid when its block holds a key of its sequence that the token may see (as `keymajor`)."""
    inb = p < total
    r = p % S
    row = p // S
    h = row % HQ
    tn = row // HQ
    t = tn % TPAD
    n = tn // TPAD
    blk = tl.load(IDX + n * stride_in + (h // DIV) * stride_ih + (t // q_block) * stride_iq + r, mask=inb, other=-1)
    nc = tl.minimum(n, NSEQ - 1)
    len_q = tl.load(CU_Q + nc + 1) - tl.load(CU_Q + nc)
    len_k = tl.load(CU_K + nc + 1) - tl.load(CU_K + nc)
    first = blk.to(tl.int64) * k_block
    valid = inb & (blk >= 0) & (blk < NKB) & (t < len_q) & (first < len_k)
    if CAUSAL:
        valid = valid & (first <= t + (len_k - len_q))
    cell = (((t // WINDOW) * NSEQ + n) * HKV + h // G) * NKB + blk
    return valid, cell


@triton.jit
def _count_kernel(IDX, COUNTS, CU_Q, CU_K, total, stride_in, stride_ih, stride_iq, NSEQ, TPAD, HQ, S, DIV, G, HKV,
                  NKB, q_block, k_block, WINDOW, CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid, cell = _entry_cells(IDX, p, total, CU_Q, CU_K, stride_in, stride_ih, stride_iq, NSEQ, TPAD, HQ, S, DIV, G,
                               HKV, NKB, q_block, k_block, WINDOW, CAUSAL)
    tl.atomic_add(COUNTS + tl.where(valid, cell, 0), tl.full([BLOCK], 1, tl.int32), mask=valid, sem="relaxed")


@triton.jit
def _scatter_kernel(IDX, CURSOR, ORDER, CU_Q, CU_K, total, stride_in, stride_ih, stride_iq, NSEQ, TPAD, HQ, S, DIV,
                    G, HKV, NKB, q_block, k_block, WINDOW, CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid, cell = _entry_cells(IDX, p, total, CU_Q, CU_K, stride_in, stride_ih, stride_iq, NSEQ, TPAD, HQ, S, DIV, G,
                               HKV, NKB, q_block, k_block, WINDOW, CAUSAL)
    ptr = CURSOR + tl.where(valid, cell, 0)
    slot = tl.atomic_add(ptr, tl.full([BLOCK], 1, CURSOR.dtype.element_ty), mask=valid, sem="relaxed")
    tl.store(ORDER + tl.where(valid, slot, 0), p.to(ORDER.dtype.element_ty), mask=valid)


class Entries(NamedTuple):
    order: torch.Tensor  # [>= E] int32/int64: flat token-major positions, grouped by cell
    off: torch.Tensor  # [cells + 1] int64: CSR offsets into `order`
    woff: torch.Tensor  # [cells + 1] int64: first work item of each cell; woff[cells]: the number of items
    wcell: torch.Tensor  # [W] int32: cell of each work item (a host bound; items past woff[cells] unused)
    cells: int
    nkb: int
    tpad: int
    s: int
    chunk: int


def build_entries(indices: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, hq: int, hkv: int, q_block: int,
                  k_block: int, nkb: int, causal: bool, chunk: int, n_sub: int, window: int) -> Entries:
    """CSR of the selection entries per (window, sequence, KV head, key block) cell, by counting."""
    n, hsel, nq, s = indices.shape
    dev = indices.device
    tpad = nq * q_block
    win = window if window > 0 else max(tpad, 1)
    nwin = triton.cdiv(max(tpad, 1), win)
    cells = nwin * n * hkv * nkb
    total = n * tpad * hq * s
    idx = indices if indices.dtype == torch.int32 and indices.stride(-1) == 1 else indices.to(torch.int32).contiguous()
    counts = torch.zeros(cells, dtype=torch.int32, device=dev)
    pos_dtype = torch.int32 if total * max(n_sub, 1) < 2**31 else torch.int64
    order = torch.zeros(max(total, 1), dtype=pos_dtype, device=dev)
    args = (cu_q, cu_k, total, idx.stride(0), idx.stride(1), idx.stride(2), n, tpad, hq, s,
            hsel_divisor(hq, hkv, hsel), hq // hkv, hkv, nkb, q_block, k_block, win)
    grid = (triton.cdiv(total, COUNT_BLOCK),)
    if total:
        _count_kernel[grid](idx, counts, *args, CAUSAL=causal, BLOCK=COUNT_BLOCK)
    off = torch.zeros(cells + 1, dtype=torch.int64, device=dev)
    off[1:] = torch.cumsum(counts, 0)
    if total:
        cursor = off[:-1].to(pos_dtype)
        _scatter_kernel[grid](idx, cursor, order, *args, CAUSAL=causal, BLOCK=COUNT_BLOCK)
        del cursor
    nchunk = (counts.long() + chunk - 1) // chunk
    woff = torch.zeros(cells + 1, dtype=torch.int64, device=dev)
    woff[1:] = torch.cumsum(nchunk, 0)
    w_max = triton.cdiv(total, chunk) + cells  # >= woff[cells]: a host-side bound, no sync
    wcell = torch.searchsorted(woff[1:], torch.arange(w_max, device=dev, dtype=torch.int64), right=True)
    return Entries(order, off, woff, wcell.to(torch.int32), cells, nkb, tpad, s, chunk)


# --- persistent kernels ---------------------------------------------------------------------------


@triton.jit
def _item(w, sub, WCELL, OFF, WOFF, CU_Q, CU_K, NSEQ, NKB, HKV, k_block, BLOCK_N: tl.constexpr,
          CHUNK: tl.constexpr):
    """Work item w -> (key tile not empty, KV head, entry range lo..hi, query start, key positions
    kn of the tile and their validity, absolute key rows, query-to-key shift)."""
    cell = tl.load(WCELL + w)
    kb = cell % NKB
    x = cell // NKB
    hk = x % HKV
    seq = (x // HKV) % NSEQ
    lo = tl.load(OFF + cell) + (w - tl.load(WOFF + cell)) * CHUNK
    hi = tl.minimum(lo + CHUNK, tl.load(OFF + cell + 1))
    q_start = tl.load(CU_Q + seq)
    len_q = tl.load(CU_Q + seq + 1) - q_start
    k_start = tl.load(CU_K + seq)
    len_k = tl.load(CU_K + seq + 1) - k_start
    k0 = kb * k_block + sub * BLOCK_N
    kstop = tl.minimum(kb * k_block + k_block, len_k)
    kn = k0 + tl.arange(0, BLOCK_N)
    return k0 < kstop, hk, lo, hi, q_start, kn, kn < kstop, (k_start + kn).to(tl.int64), len_k - len_q


@triton.jit
def _fwd_lse_kernel(
    Q, K, ORDER, OFF, WOFF, WCELL, LSE_E, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh,
    CELLS, NSEQ, NKB, HKV, HQ, TPAD, S, N_SUB, k_block, qk_scale, NPROG,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
):
    sub = tl.program_id(1)
    n_work = tl.load(WOFF + CELLS).to(tl.int32)
    d = tl.arange(0, BLOCK_D)
    for w in range(tl.program_id(0), n_work, NPROG):
        work, hk, lo, hi, q_start, kn, kvalid, kn64, shift = _item(w, sub, WCELL, OFF, WOFF, CU_Q, CU_K, NSEQ, NKB,
                                                                   HKV, k_block, BLOCK_N, CHUNK)
        if work:
            kT = tl.load(K + kn64[None, :] * stride_kt + hk * stride_kh + d[:, None],
                         mask=kvalid[None, :] & (d[:, None] < D), other=0.0)
            _lse_item(Q, kT, LSE_E, ORDER, lo, hi, q_start, kn, kvalid, shift, sub, stride_qt, stride_qh, HQ, TPAD,
                      S, N_SUB, qk_scale, D, BLOCK_D, BLOCK_M, CAUSAL, DOT_PREC)


@triton.jit
def _fwd_out_kernel(
    Q, K, V, OACC, LSE, ORDER, OFF, WOFF, WCELL, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    CELLS, NSEQ, NKB, HKV, HQ, TPAD, S, k_block, qk_scale, NPROG,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr, ATOMIC: tl.constexpr,
):
    sub = tl.program_id(1)
    n_work = tl.load(WOFF + CELLS).to(tl.int32)
    for w in range(tl.program_id(0), n_work, NPROG):
        work, hk, lo, hi, q_start, kn, kvalid, kn64, shift = _item(w, sub, WCELL, OFF, WOFF, CU_Q, CU_K, NSEQ, NKB,
                                                                   HKV, k_block, BLOCK_N, CHUNK)
        if work:
            kT, v = _key_tile(kn64, kvalid, K + hk * stride_kh, V + hk * stride_vh, stride_kt, stride_vt,
                              BLOCK_D, BLOCK_DV, D, DV)
            _out_item(Q, kT, v, OACC, LSE, ORDER, lo, hi, q_start, kn, kvalid, shift, stride_qt, stride_qh,
                      stride_ot, stride_oh, stride_lh, HQ, TPAD, S, qk_scale, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M,
                      CAUSAL, DOT_PREC, ATOMIC)


@triton.jit
def _bwd_kernel(
    Q, K, V, DO, DQ, DK_PTR, DV_PTR, LSE, DELTA, ORDER, OFF, WOFF, WCELL, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
    CELLS, NSEQ, NKB, HKV, HQ, TPAD, S, k_block, qk_scale, sm_scale, NPROG,
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
            _bwd_item(Q, K, V, DO, DQ, DK_PTR, DV_PTR, LSE, DELTA, ORDER, hk, lo, hi, q_start, kn, kvalid, kn64,
                      shift, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot,
                      stride_doh, stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
                      HQ, TPAD, S, qk_scale, sm_scale, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, CAUSAL,
                      DOT_PREC)


# --- launchers ------------------------------------------------------------------------------------


def _programs(dev: torch.device, w_max: int) -> int:
    """Size of the persistent grid (at most the work-list bound)."""
    if dev.type == "cuda":
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        return max(1, min(w_max, sms * PROGRAMS_PER_SM))
    return max(1, min(w_max, INTERPRETER_PROGRAMS))


def forward_phases(q, k, v, indices, cu_q, cu_k, max_q, max_k, q_block, k_block, causal, scale,
                   out_atomic: bool = True) -> Phases:
    """The packed forward as named steps (`entries`, `pass_a`, `lse_reduce`, `pass_c`, `cast`;
    `out_atomic` as `keymajor.forward_phases`)."""
    tq, hq, d = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    n = indices.shape[0]
    dev = q.device
    nkb = triton.cdiv(max(max_k, 1), k_block)
    bn = _block_n(k_block, FWD_MAX_BLOCK_N)
    n_sub = triton.cdiv(k_block, bn)
    chunk = max(FWD_BLOCK_M, ENTRY_CHUNK // FWD_BLOCK_M * FWD_BLOCK_M)
    bd, bdv = max(16, pow2(d)), max(16, pow2(dv))
    warps = 8 if bn >= 128 else 4
    prec = _prec(q.dtype)
    window = WINDOW

    def entries(st):
        st["ent"] = build_entries(indices, cu_q, cu_k, hq, hkv, q_block, k_block, nkb, causal, chunk, n_sub, window)

    def pass_a(st):
        ent = st["ent"]
        lse_e = torch.full((n * hq * ent.tpad * ent.s * n_sub,), float("-inf"), dtype=torch.float32, device=dev)
        if lse_e.numel():
            nprog = _programs(dev, ent.wcell.numel())
            _fwd_lse_kernel[(nprog, n_sub)](
                q, k, ent.order, ent.off, ent.woff, ent.wcell, lse_e, cu_q, cu_k,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                ent.cells, n, nkb, hkv, hq, ent.tpad, ent.s, n_sub, k_block, scale * LOG2E, nprog,
                D=d, BLOCK_D=bd, BLOCK_M=FWD_BLOCK_M, BLOCK_N=bn, CHUNK=ent.chunk, CAUSAL=causal, DOT_PREC=prec,
                num_warps=warps, num_stages=2,
            )
        st["lse_e"] = lse_e

    def lse_reduce(st):
        st["lse"] = reduce_lse(st["lse_e"], n, st["ent"].tpad, hq, st["ent"].s * n_sub, cu_q, tq)

    def pass_c(st):
        ent = st["ent"]
        oacc = torch.zeros(tq, hq, dv, dtype=torch.float32, device=dev)
        if ent.tpad * ent.s:
            lse = st["lse"]
            nprog = _programs(dev, ent.wcell.numel())
            _fwd_out_kernel[(nprog, n_sub)](
                q, k, v, oacc, lse, ent.order, ent.off, ent.woff, ent.wcell, cu_q, cu_k,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                oacc.stride(0), oacc.stride(1), lse.stride(0),
                ent.cells, n, nkb, hkv, hq, ent.tpad, ent.s, k_block, scale * LOG2E, nprog,
                D=d, DV=dv, BLOCK_D=bd, BLOCK_DV=bdv, BLOCK_M=FWD_BLOCK_M, BLOCK_N=bn, CHUNK=ent.chunk,
                CAUSAL=causal, DOT_PREC=prec, ATOMIC=out_atomic, num_warps=warps, num_stages=2,
            )
        st["oacc"] = oacc

    def cast(st):
        st["out"] = st["oacc"] if q.dtype == torch.float32 else st["oacc"].to(q.dtype)

    return [("entries", entries), ("pass_a", pass_a), ("lse_reduce", lse_reduce), ("pass_c", pass_c),
            ("cast", cast)]


def forward(q, k, v, indices, cu_q, cu_k, max_q, max_k, q_block, k_block, causal, scale):
    """Packed forward: q [Tq, Hq, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv] -> (out [Tq, Hq, Dv], lse [Hq, Tq])."""
    STATS["fwd"] += 1
    st = run_phases(forward_phases(q, k, v, indices, cu_q, cu_k, max_q, max_k, q_block, k_block, causal, scale))
    return st["out"], st["lse"]


def backward_phases(do, q, k, v, lse, delta, indices, cu_q, cu_k, max_q, max_k, q_block, k_block, causal,
                    scale) -> Phases:
    """The packed backward as named steps (`entries`, `bwd_kernel`, `cast`)."""
    tq, hq, d = q.shape
    tk, hkv, dv = v.shape
    n = indices.shape[0]
    dev = q.device
    nkb = triton.cdiv(max(max_k, 1), k_block)
    bn = _block_n(k_block, BWD_MAX_BLOCK_N)
    n_sub = triton.cdiv(k_block, bn)
    bm = BWD_BLOCK_M
    warps = 8 if max(d, dv) > 64 else 4
    chunk = max(bm, ENTRY_CHUNK // bm * bm)
    window = BWD_WINDOW

    def entries(st):
        st["ent"] = build_entries(indices, cu_q, cu_k, hq, hkv, q_block, k_block, nkb, causal, chunk, n_sub, window)

    def bwd_kernel(st):
        ent = st["ent"]
        dq = torch.zeros(tq, hq, d, dtype=torch.float32, device=dev)
        dk = torch.zeros(tk, hkv, d, dtype=torch.float32, device=dev)
        dvv = torch.zeros(tk, hkv, dv, dtype=torch.float32, device=dev)
        if ent.tpad * ent.s:
            nprog = _programs(dev, ent.wcell.numel())
            _bwd_kernel[(nprog, n_sub)](
                q, k, v, do, dq, dk, dvv, lse, delta, ent.order, ent.off, ent.woff, ent.wcell, cu_q, cu_k,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1),
                dvv.stride(0), dvv.stride(1), lse.stride(0),
                ent.cells, n, nkb, hkv, hq, ent.tpad, ent.s, k_block, scale * LOG2E, scale, nprog,
                D=d, DV=dv, BLOCK_D=max(16, pow2(d)), BLOCK_DV=max(16, pow2(dv)), BLOCK_M=bm, BLOCK_N=bn,
                CHUNK=ent.chunk, CAUSAL=causal, DOT_PREC=_prec(q.dtype), num_warps=warps, num_stages=2,
            )
        st["grads32"] = (dq, dk, dvv)

    def cast(st):
        st["grads"] = cast_grads(st["grads32"], q)

    return [("entries", entries), ("bwd_kernel", bwd_kernel), ("cast", cast)]


def backward(do, q, k, v, lse, delta, indices, cu_q, cu_k, max_q, max_k, q_block, k_block, causal, scale):
    """Packed backward (`delta = rowsum(dO * O) - dlse`, `[Hq, Tq]`): (dq, dk, dv)."""
    STATS["bwd"] += 1
    return run_phases(backward_phases(do, q, k, v, lse, delta, indices, cu_q, cu_k, max_q, max_k, q_block, k_block,
                                      causal, scale))["grads"]


__all__ = ["build_entries", "forward", "backward", "forward_phases", "backward_phases", "STATS",
           "WINDOW", "BWD_WINDOW", "ENTRY_CHUNK"]
