"""`moba`: Mixture of Block Attention (MoBA, Lu et al. 2025; "Optimizing MoBA").

Keys are cut into blocks of `block_size`. Per query head, the gate of query i for block b is
`s(i, b) = q_i . mean(k in block b)` (mean over the block's existing keys). Block b is a candidate
iff its first key is causally visible (`b * block_size <= i` after bottom-right alignment); the
query's own block is always selected and counts toward `topk`; the `topk` highest-gated candidates
are attended, the own block causally (the executor applies causality token by token). Without
causality every block is a candidate. Gradients flow through attention, not through the gate.

Selection: `KVSelection(indices [B, Hq, Tq, min(topk, Nk)], q_block=1, k_block=block_size)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .. import config
from ..core.checks import check_int
from ..core.contract import AttentionCall
from ..core.selection import KVSelection, cdiv
from ..core.topk import streaming_topk, tile_budget, tile_sizes
from ..registry import MethodOptions, register_selection
from .gemm import bmm_f32, compute_dtype, half_gemm, split_half
from .router import block_mean, compact_rows, routed_kernel, seq_view


def _variants(call: AttentionCall, opts: "MobaOptions") -> list[tuple[str, bool, str]]:
    """The fused gate + top-k kernel, the default where it can serve (`router.routed_kernel`)."""
    from . import router

    row = router.kernel_variant("routed_topk", call, config.get().routed_topk_devices,
                                "fused gate + top-k Triton kernel (PyTorch tiles past its maximum topk)")
    return [row]


@dataclass(frozen=True)
class MobaOptions(MethodOptions):
    block_size: int
    topk: int

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size, 1)
        check_int("topk", self.topk, 1)


def policy(call: AttentionCall, opts: MobaOptions) -> KVSelection:
    """The MoBA selection of a validated call (no gradients)."""
    view = seq_view(call)
    bs = opts.block_size
    N, Tq, Hq, D = view.q.shape
    Hkv, G, nk = view.k.shape[2], Hq // view.k.shape[2], cdiv(view.tk, bs)
    with torch.no_grad():
        cd = compute_dtype(call.dtype)
        means = block_mean(view.k, bs, view.k_len).permute(0, 2, 3, 1)  # [N, Hkv, D, nk] float32
        q_pos = view.q_pos()
        first = torch.arange(nk, device=q_pos.device) * bs  # first key of each block [nk]
        k_len = view.k_len.view(N, 1, 1, 1, 1)
        # On CUDA with bf16 inputs the gate GEMM runs on the tensor cores: q stays bf16 and the
        # float32 block means are split into three bf16 terms (`split_half`; bf16 has float32's
        # exponent range, so no term underflows), one GEMM over 3 * D gives the float32 scores;
        # elsewhere (fp16 too) q is cast to the compute dtype.
        split = call.dtype == torch.bfloat16 and half_gemm(q_pos.device, call.dtype)
        terms = 3 if split else 1
        gate_keys = (torch.cat(split_half(means, call.dtype), dim=2) if split else means)  # [N, Hkv, terms*D, nk]
        qg = view.q if split else view.q.to(cd)
        kernel = routed_kernel(q_pos.device, call.dtype, min(opts.topk, nk))
        if kernel is not None:  # fused: scores stay on chip, one pass per row tile, rows come out compact
            gate_keys = gate_keys.view(N, Hkv, terms, D, nk).to(qg.dtype)
            idx = kernel.routed_topk(qg, gate_keys, view.k_len, view.offset, view.causal, bs, opts.topk)
            return KVSelection(idx, q_block=1, k_block=bs)
        gate_keys = gate_keys.reshape(N * Hkv, terms * D, nk)
        qg = qg.view(N, Tq, Hkv, G, D).permute(0, 2, 3, 1, 4)  # [N, Hkv, G, Tq, D]

        def score(rows: slice, cols: slice) -> torch.Tensor:  # [N, Hq, R, C]
            R = rows.stop - rows.start
            qt = qg[..., rows, :]
            if terms > 1:
                qt = torch.cat([qt] * terms, dim=-1)
            s = bmm_f32(qt.reshape(N * Hkv, G * R, terms * D), gate_keys[..., cols])  # [N*Hkv, G*R, C]
            p = q_pos[rows].view(-1, 1)
            f = first[cols].view(1, -1)
            cand = f < k_len  # [N, 1, 1, 1, C]
            if view.causal:
                cand = cand & (f <= p)
            own = (p // bs) == torch.arange(cols.start, cols.stop, device=p.device).view(1, -1)
            # -inf for non-candidates, +inf for the own block (forced), written over the score: a
            # non-finite gate (a NaN key in a future block) must not survive its mask
            s = s.view(N, Hkv, G, R, -1).masked_fill_(~cand, float("-inf")).masked_fill_(own, float("inf"))
            return s.reshape(N, Hq, R, s.shape[-1])

        def col_stop(rows: slice) -> int:
            return (rows.stop - 1 + view.offset) // bs + 1 if view.causal else nk

        dev = q_pos.device
        per_pair = N * Hq * 2
        row_chunk, col_chunk = tile_sizes(Tq, nk, elems_per_pair=per_pair, device=dev)
        _, idx = streaming_topk(score, (N, Hq), Tq, nk, opts.topk, row_chunk=row_chunk, col_chunk=col_chunk,
                                col_stop=col_stop, dtype=cd, device=dev,
                                max_tile_elems=tile_budget(dev) // per_pair, ordered=False)
    return KVSelection(compact_rows(idx, opts.topk), q_block=1, k_block=bs)


def select(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int, causal: bool = True,
           cu_seqlens: Optional[torch.Tensor] = None) -> KVSelection:
    """MoBA's selection for `q: [B, Tq, Hq, D]`, `k: [B, Tk, Hkv, D]`: per query head, the own block
    plus the `topk - 1` past blocks with the highest gate `q . mean(k in block)`.

    Returns `KVSelection(indices int32 [B (N under varlen), Hq, Tq, min(topk, Nk)], 1, block_size)`."""
    return SPEC.selection(q, k, causal=causal, cu_seqlens=cu_seqlens, block_size=block_size, topk=topk)


def _example(call: AttentionCall) -> dict[str, Any]:
    block = max(1, min(64, call.tk // 8))
    return {"block_size": block, "topk": 3}


SPEC = register_selection("moba", MobaOptions, policy, family="sparse", example=_example, variants=_variants,
                          paper="MoBA: Mixture of Block Attention; Optimizing MoBA",
                          summary="per query head, the own block plus the top-k past key blocks "
                                  "by q . mean(k in block)")
