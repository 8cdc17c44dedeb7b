"""The Triton sparse executor as `torch.library` custom ops, with autograd.

`sparse_attention(q, k, v, indices, q_block, k_block, ...)` runs attention of each query over the
key blocks of its selection row (see docs/design.md "A sparse method is a selection plus an executor")
with the kernels of `querymajor`:

- block mode: `q_block` a multiple of 16; a tile is up to 128 consecutive queries of one head;
- token mode (any other `q_block`, MoBA / NSA with `q_block == 1`): a tile is one token and the
  query heads sharing its selection row (the whole KV group when `Hsel` is `Hkv` or 1);
- keys are contiguous tiles inside each selected block, or gathered per selection entry when
  `k_block < 16` (DSA's token-level keys, `k_block == 1`);
- key-major (`keymajor`): token mode with fewer than 8 query heads per selection row and KV
  head (MoBA's `Hsel == Hq`) and contiguous key blocks: a program owns a key block and gathers the
  queries that selected it (`ATTNKIT_SPARSE_KEYMAJOR=0` turns it off). The `sparse_keymajor_variant`
  setting picks its kernels: `keymajor` ("sorted"), `keymajor_windowed` ("windowed": token-windowed
  cells, a counting-sort entry list, persistent programs) or `keymajor_onepass` ("onepass": the
  windowed traversal with a score bound instead of the LSE pass in the forward).

The ops work on packed tensors (`[T_total, H, D]` with `cu_q`, `cu_k`); `sparse_attention` packs a
batch (a view), runs the op and unpacks. `attnkit::sparse_attn_fwd` returns `(out, lse)`, its
backward is `attnkit::sparse_attn_bwd`, so `torch.compile` sees two opaque ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from ... import config
from .. import launch_env as _launch_env
from ..jit import dot_precision, pow2
from . import keymajor, keymajor_onepass, keymajor_windowed
from . import querymajor as kern
from .plan import (TilePlan, block_candidates, heads_per_tile, hsel_divisor, pick_config,  # noqa: F401
                   plan_query_tiles, tuned_configs)
from ...core.contract import AttnkitError

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128


KEYMAJOR_VARIANTS = {  # setting -> (forward, backward)
    "sorted": (keymajor.forward, keymajor.backward),
    "windowed": (keymajor_windowed.forward, keymajor_windowed.backward),
    "onepass": (keymajor_onepass.forward, keymajor_windowed.backward),
}


def _keymajor_variant():
    """(forward, backward) of the key-major kernels the `sparse_keymajor_variant` setting picks."""
    name = config.get().sparse_keymajor_variant
    if name not in KEYMAJOR_VARIANTS:
        raise AttnkitError(f"sparse_keymajor_variant: expected one of {sorted(KEYMAJOR_VARIANTS)}, got {name!r}")
    return KEYMAJOR_VARIANTS[name]


def _forward(q, k, v, indices, cu_q, cu_k, max_q, q_block, k_block, causal, scale, max_k=None):
    """Packed forward: q [Tq, Hq, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv] -> out [Tq, Hq, Dv], lse [Hq, Tq]."""
    tq, hq, d = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    n, hsel, _, s = indices.shape
    out = torch.empty(tq, hq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(hq, tq, dtype=torch.float32, device=q.device)
    if tq == 0 or n == 0:
        return out, lse
    if max_k is not None and keymajor.uses_keymajor(hq, hkv, hsel, q_block, k_block):
        return _keymajor_variant()[0](q, k, v, indices, cu_q, cu_k, max_q, max_k, q_block, k_block, causal, scale)
    p = plan_query_tiles(hq, hkv, hsel, q_block, k_block, d)

    def launch(cfg):
        bm, bn, warps, stages = cfg
        rh = 1 if p.rh == 1 else bm
        grid = (triton.cdiv(max(max_q, 1), bm // rh), n, hq // p.r)
        kern._fwd_kernel[grid](
            q, k, v, out, lse, indices, cu_q, cu_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
            out.stride(1), indices.stride(0), indices.stride(1), indices.stride(2), lse.stride(0),
            s, q_block, k_block, hq // hkv, hsel_divisor(hq, hkv, hsel), p.r, scale * kern.LOG2E,
            D=d, DV=dv, BLOCK_D=max(16, pow2(d)), BLOCK_DV=max(16, pow2(dv)),
            BLOCK_M=bm, BLOCK_N=bn, RH=rh, GATHER=p.gather, CAUSAL=causal,
            DOT_PREC=dot_precision(q.dtype), num_warps=warps, num_stages=stages,
        )

    default = (p.block_m, p.block_n, p.num_warps, p.num_stages)
    cands = [default]
    if p.rh == 1 and q.is_cuda:
        cands += [c for c in block_candidates("fwd", q_block, k_block, d > 64) if c != default]
    launch(pick_config(("fwd", p.rh, p.gather, d, dv, q.dtype, q_block, k_block, causal), cands, launch))
    return out, lse


def reverse_index(indices: torch.Tensor, num_k_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR transpose of a selection: for each (sequence, selection head, key block) cell, the query
    blocks whose rows list it. Returns `qoff` int32 `[N * Hsel * num_k_blocks + 1]` and `qlist`
    int32 (query-block ids, ascending within a cell). O(selection size), on the selection's device."""
    n, hs, nq, s = indices.shape
    cells = n * hs * num_k_blocks
    idx = indices.long()
    valid = idx >= 0
    base = (torch.arange(n, device=idx.device).view(n, 1, 1, 1) * hs
            + torch.arange(hs, device=idx.device).view(1, hs, 1, 1)) * num_k_blocks
    cell = (base + idx)[valid]
    qb = torch.arange(nq, device=idx.device).view(1, 1, nq, 1).expand_as(idx)[valid]
    order = torch.argsort(cell, stable=True)
    qlist = qb[order].to(torch.int32)
    qoff = torch.zeros(cells + 1, dtype=torch.int64, device=idx.device)
    qoff[1:] = torch.cumsum(torch.bincount(cell, minlength=cells), 0)
    if qlist.numel() == 0:
        qlist = torch.full((1,), -1, dtype=torch.int32, device=idx.device)
    return qoff.to(torch.int32), qlist


def backward_delta(do: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   dlse: Optional[torch.Tensor]) -> torch.Tensor:
    """`delta = rowsum(dO * O) - dlse`, `[Hq, Tq]` float32 (`dlse` ignored where the row saw no key):
    the softmax-gradient term every backward kernel reads."""
    delta = (do.float() * out.float()).sum(-1).transpose(0, 1).contiguous()  # [Hq, Tq]
    if dlse is not None:
        delta = delta - torch.where(torch.isinf(lse), torch.zeros_like(dlse), dlse.float())
    return delta


def _backward(do, q, k, v, out, lse, dlse, indices, cu_q, cu_k, max_q, max_k, q_block, k_block, causal, scale):
    tq, hq, d = q.shape
    tk, hkv, dv = v.shape
    n, hsel, _, s = indices.shape
    do = do.contiguous()
    delta = backward_delta(do, out, lse, dlse)
    if tq > 0 and n > 0 and keymajor.uses_keymajor(hq, hkv, hsel, q_block, k_block):
        return _keymajor_variant()[1](do, q, k, v, lse, delta, indices, cu_q, cu_k, max_q, max_k, q_block, k_block,
                                      causal, scale)
    dq = torch.empty_like(q)
    g = hq // hkv
    div = hsel_divisor(hq, hkv, hsel)
    prec = dot_precision(q.dtype)
    bd, bdv = max(16, pow2(d)), max(16, pow2(dv))
    p = plan_query_tiles(hq, hkv, hsel, q_block, k_block, d, backward=True)
    if p.gather:  # dk/dv accumulate atomically in float32 from the query tiles
        dk_acc = torch.zeros(tk, hkv, d, dtype=torch.float32, device=q.device)
        dv_acc = torch.zeros(tk, hkv, dv, dtype=torch.float32, device=q.device)
    else:
        dk_acc, dv_acc = torch.empty_like(k), torch.empty_like(v)
    if tq == 0 or n == 0:
        return dq.zero_(), dk_acc.zero_().to(k.dtype), dv_acc.zero_().to(v.dtype)
    def launch_dq(cfg):
        bm, bn, warps, stages = cfg
        rh = 1 if p.rh == 1 else bm
        grid = (triton.cdiv(max(max_q, 1), bm // rh), n, hq // p.r)
        kern._bwd_dq_kernel[grid](
            q, k, v, do, dq, dk_acc, dv_acc, lse, delta, indices, cu_q, cu_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), dk_acc.stride(0), dk_acc.stride(1),
            dv_acc.stride(0), dv_acc.stride(1),
            indices.stride(0), indices.stride(1), indices.stride(2), lse.stride(0),
            s, q_block, k_block, g, div, p.r, scale * kern.LOG2E, scale,
            D=d, DV=dv, BLOCK_D=bd, BLOCK_DV=bdv, BLOCK_M=bm, BLOCK_N=bn, RH=rh,
            GATHER=p.gather, CAUSAL=causal, DOT_PREC=prec, ATOMIC_KV=p.gather,
            num_warps=warps, num_stages=stages,
        )

    default = (p.block_m, p.block_n, p.num_warps, p.num_stages)
    cands = [default]
    if p.rh == 1 and not p.gather and q.is_cuda:  # atomic (gather) mode accumulates: never re-run
        cands += [c for c in block_candidates("dq", q_block, k_block, d > 64) if c != default]
    launch_dq(pick_config(("dq", p.rh, p.gather, d, dv, q.dtype, q_block, k_block, causal), cands, launch_dq))
    if p.gather:
        return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype)
    nkb = triton.cdiv(max(max_k, 1), k_block)
    qoff, qlist = reverse_index(indices, nkb)
    big = max(d, dv) > 64

    def launch_dkdv(cfg):
        bm, bn, warps, stages = cfg
        n_sub = triton.cdiv(k_block, bn)
        grid = (nkb * n_sub, n, hkv)
        kern._bwd_dkdv_kernel[grid](
            q, k, v, do, dk_acc, dv_acc, lse, delta, qoff, qlist, cu_q, cu_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), dk_acc.stride(0), dk_acc.stride(1), dv_acc.stride(0), dv_acc.stride(1),
            lse.stride(0),
            q_block, k_block, n_sub, nkb, hsel, g, div, scale * kern.LOG2E, scale,
            D=d, DV=dv, BLOCK_D=bd, BLOCK_DV=bdv, BLOCK_M=bm, BLOCK_N=bn,
            Q_GATHER=q_block < bm, CAUSAL=causal, DOT_PREC=prec,
            num_warps=warps, num_stages=stages,
        )

    default = (32 if big else 64, 64 if k_block % 64 == 0 or k_block > 64 else max(16, pow2(k_block)),
               8 if big else 4, 2)
    cands = [default]
    if q.is_cuda and q_block >= 64:
        cands += [c for c in block_candidates("dkdv", q_block, k_block, big) if c != default and c[1] <= k_block]
    launch_dkdv(pick_config(("dkdv", q_block >= 64, d, dv, q.dtype, q_block, k_block, causal), cands, launch_dkdv))
    return dq, dk_acc, dv_acc


# --- custom ops -------------------------------------------------------------------------------


@torch.library.custom_op("attnkit::sparse_attn_fwd", mutates_args=())
def sparse_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, cu_q: torch.Tensor,
                    cu_k: torch.Tensor, max_q: int, max_k: int, q_block: int, k_block: int, causal: bool,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed sparse attention forward: `(out [Tq, Hq, Dv], lse [Hq, Tq] float32)`."""
    with _launch_env():
        return _forward(q, k, v, indices, cu_q, cu_k, max_q, q_block, k_block, causal, scale, max_k)


@sparse_attn_fwd.register_fake
def _(q, k, v, indices, cu_q, cu_k, max_q, max_k, q_block, k_block, causal, scale):
    return (q.new_empty(q.shape[0], q.shape[1], v.shape[2]),
            q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32))


@torch.library.custom_op("attnkit::sparse_attn_bwd", mutates_args=())
def sparse_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, dlse: Optional[torch.Tensor], indices: torch.Tensor, cu_q: torch.Tensor,
                    cu_k: torch.Tensor, max_q: int, max_k: int, q_block: int, k_block: int, causal: bool,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed sparse attention backward: `(dq, dk, dv)`."""
    with _launch_env():
        return _backward(do, q, k, v, out, lse, dlse, indices, cu_q, cu_k, max_q, max_k, q_block, k_block, causal,
                         scale)


@sparse_attn_bwd.register_fake
def _(do, q, k, v, out, lse, dlse, indices, cu_q, cu_k, max_q, max_k, q_block, k_block, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, indices, cu_q, cu_k, max_q, max_k, q_block, k_block, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, indices, cu_q, cu_k)
    ctx.args = (max_q, max_k, q_block, k_block, causal, scale)


def _autograd_backward(ctx, dout, dlse):
    q, k, v, out, lse, indices, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = sparse_attn_bwd(dout, q, k, v, out, lse, dlse, indices, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("attnkit::sparse_attn_fwd", _autograd_backward, setup_context=_setup_context)


# --- public entry -----------------------------------------------------------------------------


def why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor) -> Optional[str]:
    """None when these kernels can serve the call, else the reason (checked before any launch)."""
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} not supported (fp16, bf16, fp32)"
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]}/{v.shape[-1]} > {MAX_HEAD_DIM}"
    return None


def _packed(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, D] -> [B * T, H, D] with unit stride on D (a view when already contiguous)."""
    x = x if x.stride(-1) == 1 and x.is_contiguous() else x.contiguous()
    return x.reshape(x.shape[0] * x.shape[1], x.shape[2], x.shape[3])


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, q_block: int,
                     k_block: int, *, causal: bool = True, scale: Optional[float] = None,
                     cu_seqlens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`q [B, Tq, Hq, D]`, `k [B, Tk, Hkv, D]`, `v [B, Tk, Hkv, Dv]`, `indices int32 [N, Hsel, Nq, S]`
    (N = B, or the number of sequences under varlen) -> `(out [B, Tq, Hq, Dv], lse [B, Hq, Tq])`.

    Inputs are assumed validated by `ops.sparse_attention`. Differentiable in q, k, v."""
    reason = why_not(q, k, v, indices)
    if reason:
        raise AttnkitError(f"triton sparse attention: {reason}")
    B, Tq, Hq, _ = q.shape
    Tk = k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dev = q.device
    idx = indices.to(torch.int32).contiguous()
    if cu_seqlens is None:
        cu_q = torch.arange(0, (B + 1) * Tq, Tq, dtype=torch.int32, device=dev)
        cu_k = torch.arange(0, (B + 1) * Tk, Tk, dtype=torch.int32, device=dev)
        max_q, max_k = Tq, Tk
    else:
        cu_q = cu_k = cu_seqlens.to(device=dev, dtype=torch.int32).contiguous()
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        max_q = max_k = int(max(lengths)) if lengths else 0
    out, lse = sparse_attn_fwd(_packed(q), _packed(k), _packed(v), idx, cu_q, cu_k, max_q, max_k,
                               int(q_block), int(k_block), bool(causal), scale)
    out = out.view(B, Tq, Hq, v.shape[-1])
    lse = lse.view(Hq, B, Tq).permute(1, 0, 2)
    return out, lse


__all__ = ["sparse_attention", "sparse_attn_fwd", "sparse_attn_bwd", "plan_query_tiles", "reverse_index", "why_not",
           "backward_delta", "KEYMAJOR_VARIANTS"]
