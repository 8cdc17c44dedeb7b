"""Triton split-K decode over a paged KV cache (`kv.PagedLayerCache`), reading only what is selected.

Imported lazily by `ops.decode` (never by `import attnkit`). One program owns one KV head of one
sequence (a cache *row*) and one split of its key list; its query tile holds the `G * Tq` query
rows of that KV head (all query heads of the group, all decode queries), so each key is read once
for the whole group (GQA-aware). Splits write partial outputs and log-sum-exps that a small
PyTorch step merges (flash-decoding).

Key lists, by `MODE`:
- 0, dense: every logical page of the row, in order;
- 1, pages: the logical pages a selection row lists (`k_block == page_size`, Quest);
- 2, tokens: the logical slots a selection row lists (`k_block == 1`, recycled / routed).
Each slot is mapped through the page table to the pool; free slots (position -1), slots past a
query's position (causal) and padding (-1) are masked. Per-slot log-weights are added to scores.
Offsets into the pools are int64. Softmax in base 2 with fp32 accumulation.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import triton
import triton.language as tl

from .. import config
from ..core.selection import KVSelection
from .jit import pow2
from ..core.contract import AttnkitError

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Under Triton's CPU interpreter bf16 dot operands are mishandled (see kernels/jit.py):
# there every dot runs on fp32 copies, which is what tensor cores compute on the GPU.
INTERPRETED = tl.constexpr(config.triton_interpret())


# Warps and pipelining by measurement; one config under the interpreter (it cannot time).
_CONFIGS = [triton.Config({}, num_warps=4, num_stages=2)] if config.triton_interpret() \
    else [triton.Config({}, num_warps=w, num_stages=st) for w in (4, 8) for st in (2, 3, 4)]


@triton.autotune(configs=_CONFIGS, key=["MODE", "PAGE", "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "CAUSAL"])
@triton.jit
def _decode_split_kernel(
    Q, QPos, Kp, Vp, Pos, Bias, PT, Sel, Out, Lse,
    stride_qb, stride_qt, stride_qh,
    n_heads_kv, G, Tq, maxp, n_items, sel_stride_b, sel_stride_h, items_per_split,
    qk_scale,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, MODE: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
):
    row = tl.program_id(0)  # b * Hkv + h
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = row // n_heads_kv
    h = row % n_heads_kv

    # query tile: m -> (group member g, query t)
    m = tl.arange(0, BLOCK_M)
    g = m // Tq
    t = m % Tq
    m_valid = g < G
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_ptr = Q + b.to(tl.int64) * stride_qb + t[:, None].to(tl.int64) * stride_qt \
        + (h * G + g)[:, None].to(tl.int64) * stride_qh + d[None, :]
    q = tl.load(q_ptr, mask=m_valid[:, None] & (d[None, :] < D), other=0.0)
    if INTERPRETED:
        q = q.to(tl.float32)
    qpos = tl.load(QPos + b * Tq + t, mask=m_valid, other=0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    start = split * items_per_split
    stop = tl.minimum(start + items_per_split, n_items)
    n = tl.arange(0, BLOCK_N)
    sel_base = Sel + b.to(tl.int64) * sel_stride_b + h.to(tl.int64) * sel_stride_h
    if MODE == 2:
        step = BLOCK_N
    else:
        step = BLOCK_N // PAGE
    for it in range(start, stop, step):
        if MODE == 2:
            j = it + n
            ok = j < stop
            lslot = tl.load(sel_base + j, mask=ok, other=-1).to(tl.int64)
            ok = ok & (lslot >= 0)
            lpage = lslot // PAGE
            off = lslot % PAGE
        else:
            j = it + n // PAGE
            ok = j < stop
            if MODE == 0:
                lpage = j.to(tl.int64)
            else:
                lpage = tl.load(sel_base + j, mask=ok, other=-1).to(tl.int64)
                ok = ok & (lpage >= 0)
            off = n % PAGE
            ok = ok & (n < (BLOCK_N // PAGE) * PAGE)  # whole pages per tile when PAGE is not a power of 2
        ppage = tl.load(PT + row.to(tl.int64) * maxp + lpage, mask=ok, other=-1).to(tl.int64)
        ok = ok & (ppage >= 0)
        phys = ppage * PAGE + off  # [BLOCK_N] int64 slot in the pool
        kpos = tl.load(Pos + phys, mask=ok, other=-1)
        ok = ok & (kpos >= 0)
        kbias = tl.load(Bias + phys, mask=ok, other=0.0)
        k = tl.load(Kp + phys[:, None] * D + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0)
        if INTERPRETED:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale + (kbias * 1.4426950408889634)[None, :]  # [BLOCK_M, BLOCK_N]
        vis = ok[None, :] & m_valid[:, None]
        if CAUSAL:
            vis = vis & (kpos[None, :] <= qpos[:, None])
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(Vp + phys[:, None] * DV + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
        if INTERPRETED:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    base = (row.to(tl.int64) * n_splits + split) * BLOCK_M
    tl.store(Out + (base + m)[:, None] * BLOCK_DV + dv[None, :], out)
    tl.store(Lse + base + m, lse)


def _block_n(mode: int, page: int) -> int:
    """Keys per tile: 64 gathered slots (MODE 2), or whole pages filling at least 64 slots
    (`ATTNKIT_DECODE_BLOCK_N` overrides the 64, for measuring)."""
    base = config.get().decode_block_n
    return base if mode == 2 else max(base, pow2(page, 16))


def _step(mode: int, page: int) -> int:
    """Items (slots for MODE 2, pages otherwise) consumed per tile."""
    return _block_n(mode, page) if mode == 2 else _block_n(mode, page) // page


def selection_mode(selection: Optional[KVSelection], page_size: int) -> tuple[int, Optional[str]]:
    """`(MODE, reason or None)` for a selection: which key list the kernel walks."""
    if selection is None:
        return 0, None
    if selection.num_q_blocks != 1:
        return -1, "selection must have one row for all decode queries (Nq == 1)"
    if selection.k_block == page_size:
        return 1, None
    if selection.k_block == 1:
        return 2, None
    return -1, f"selection.k_block must be the page size ({page_size}) or 1, got {selection.k_block}"


def default_splits(rows: int, iters: int) -> int:
    """Enough programs to keep a large GPU's memory system busy (about 8 per SM: with too few
    splits a long cache is read by too few programs to reach the bandwidth of cuDNN's decode; the
    sweep over split counts is in docs/kv_cache.md, "Measured: decode on an H100") without splits
    of under 4 iterations."""
    splits = config.get().decode_splits
    if splits:
        return splits
    return max(1, min(triton.cdiv(iters, 4), triton.cdiv(1056, rows)))


@torch.library.custom_op("attnkit::paged_decode_split", mutates_args=())
def _paged_decode_op(q: torch.Tensor, q_pos: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                     pos_pool: torch.Tensor, bias_pool: torch.Tensor, page_table: torch.Tensor, sel: torch.Tensor,
                     n_heads_kv: int, n_items: int, sel_stride_h: int, scale: float, mode: int, causal: bool,
                     num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial outputs `[R, splits, BLOCK_M, BLOCK_DV]` and LSEs `[R, splits, BLOCK_M]` (float32)."""
    B, Tq, Hq, D = q.shape
    P, PAGE, DV = v_pool.shape
    G = Hq // n_heads_kv
    R = B * n_heads_kv
    BLOCK_M, BLOCK_D, BLOCK_DV = pow2(G * Tq, 16), pow2(D, 16), pow2(DV, 16)
    BLOCK_N = _block_n(mode, PAGE)
    out = torch.empty(R, num_splits, BLOCK_M, BLOCK_DV, dtype=torch.float32, device=q.device)
    lse = torch.empty(R, num_splits, BLOCK_M, dtype=torch.float32, device=q.device)
    step = _step(mode, PAGE)
    iters = triton.cdiv(n_items, step)
    per_split = triton.cdiv(iters, num_splits) * step
    sel_stride_b = sel.stride(0) if sel.dim() == 4 else 0
    _decode_split_kernel[(R, num_splits)](
        q, q_pos, k_pool, v_pool, pos_pool, bias_pool, page_table, sel, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        n_heads_kv, G, Tq, page_table.shape[1], n_items, sel_stride_b, sel_stride_h, per_split,
        scale * LOG2E,
        PAGE=PAGE, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, D=D, DV=DV,
        MODE=mode, CAUSAL=causal, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )  # num_warps, num_stages: autotuned
    return out, lse


@_paged_decode_op.register_fake
def _(q, q_pos, k_pool, v_pool, pos_pool, bias_pool, page_table, sel, n_heads_kv, n_items, sel_stride_h, scale,
      mode, causal, num_splits):
    B, Tq, Hq, D = q.shape
    R = B * n_heads_kv
    bm, bdv = pow2((Hq // n_heads_kv) * Tq, 16), pow2(v_pool.shape[-1], 16)
    return (q.new_empty(R, num_splits, bm, bdv, dtype=torch.float32),
            q.new_empty(R, num_splits, bm, dtype=torch.float32))


def paged_decode(q: torch.Tensor, cache: Any, selection: Optional[KVSelection], *, scale: float,
                 causal: bool = True, num_splits: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention through the kernel: `(out [B, Tq, Hq, Dv], lse [B, Hq, Tq] float32)`.
    Inputs are validated by `ops.decode.decode_attention`."""
    B, Tq, Hq, D = q.shape
    H, PAGE = cache.num_heads, cache.page_size
    G = Hq // H
    mode, reason = selection_mode(selection, PAGE)
    if reason:
        raise AttnkitError(f"selection: {reason}")
    if mode == 0:
        sel = torch.empty(1, dtype=torch.int32, device=q.device)
        n_items, sel_stride_h = cache.page_table.shape[1], 0
    else:
        sel = selection.indices.to(torch.int32).contiguous()  # [B, Hsel, 1, S]
        n_items = sel.shape[-1]
        sel_stride_h = sel.stride(1) if sel.shape[1] == H and H > 1 else 0
    q_pos = (cache.seen.view(B, 1) - Tq + torch.arange(Tq, device=q.device)).contiguous()
    splits = num_splits or default_splits(B * H, triton.cdiv(max(n_items, 1), _step(mode, PAGE)))
    part_o, part_l = _paged_decode_op(q.contiguous(), q_pos, cache.k_pool, cache.v_pool, cache.pos_pool,
                                      cache.bias_pool, cache.page_table.contiguous(), sel, H, n_items,
                                      sel_stride_h, float(scale), mode, bool(causal), splits)
    # merge splits: [R, S, M, Dv] -> [B, Hkv, G, Tq, Dv]
    lse = torch.logsumexp(part_l, 1)  # [R, M]
    w = torch.exp(part_l - torch.where(torch.isinf(lse), 0, lse).unsqueeze(1))
    w = torch.nan_to_num(w, nan=0.0)
    out = (part_o * w.unsqueeze(-1)).sum(1)  # [R, M, BLOCK_DV]
    M = G * Tq
    out = out[:, :M, : cache.head_dim_v].view(B, H, G, Tq, -1).permute(0, 3, 1, 2, 4).reshape(B, Tq, Hq, -1)
    lse = lse[:, :M].view(B, H, G, Tq).reshape(B, Hq, Tq)
    return out.to(q.dtype), lse
