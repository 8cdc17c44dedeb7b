"""Backend implementations shared by the softmax executors (`dense`, `masked`, `sparse`).

Each function takes a validated `AttentionCall` and returns `out`, or `(out, lse)` when the call
asked for the LSE. They are the targets of the registry's backends and of the `ops` functions.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..core.contract import AttentionCall
from ..core.masks import Mask
from ..core.reference import blockwise_attention
from ..core.selection import KVSelection


def finish(call: AttentionCall, out: torch.Tensor, lse: Optional[torch.Tensor]) -> Any:
    return (out, lse) if call.return_lse else out


class _Empty(torch.autograd.Function):
    """Zeros that depend on q, k, v (zero gradients), without touching their values: a result
    built as `0 * x` would turn a NaN input into a NaN output."""

    @staticmethod
    def forward(ctx, q, k, v, shape):  # type: ignore[no-untyped-def]
        ctx.meta = [(t.shape, t.dtype, t.device) for t in (q, k, v)]
        return q.new_zeros(shape)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        return (*(torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.meta), None)


def run_empty(call: AttentionCall) -> Any:
    """The result of a call with no query or no key (`call.empty`), as SDPA gives it: an empty
    output, or rows of zeros with LSE -inf when no key exists."""
    B, Tq, Hq = call.batch, call.tq, call.hq
    out = _Empty.apply(call.q, call.k, call.v, (B, Tq, Hq, call.head_dim_v))
    lse = torch.full((B, Hq, Tq), float("-inf"), device=call.device,
                     dtype=torch.float64 if call.dtype == torch.float64 else torch.float32)
    return finish(call, out, lse)


def run_reference(call: AttentionCall, mask: Optional[Mask] = None, selection: Optional[KVSelection] = None) -> Any:
    """Memory-efficient blockwise reference (any device, any dtype, LSE, varlen, backward)."""
    out, lse = blockwise_attention(call.q, call.k, call.v, causal=call.causal, scale=call.scale,
                                   cu_seqlens=call.cu_seqlens, mask=mask, selection=selection)
    return finish(call, out, lse)


def sdpa_why_not(call: AttentionCall) -> Optional[str]:
    """Why `torch.nn.functional.scaled_dot_product_attention` cannot run a dense call, or None."""
    if call.causal and call.tq != call.tk and call.tq != 1:
        return "causal with Tq != Tk needs bottom-right alignment; SDPA's is_causal aligns top-left"
    return None


def run_sdpa(call: AttentionCall) -> Any:
    """Dense attention through PyTorch SDPA (cuDNN / flash / efficient kernels on GPU)."""
    # a single query aligned bottom-right sees every key: that is non-causal attention
    is_causal = call.causal and call.tq > 1
    k, v, reached = call.k, call.v, None
    if is_causal:
        # SDPA weights masked keys by 0, and 0 * NaN would reach rows that cannot see a bad key: run
        # it on zero-filled keys/values and set the rows at or after a bad key (Tq == Tk here) to NaN.
        # Unconditional, so the call never waits on the device (CUDA graphs, torch.compile): it costs
        # one extra read and write of K and V, small next to the attention itself.
        fin_k, fin_v = torch.isfinite(k), torch.isfinite(v)
        bad = ~(fin_k.all(-1) & fin_v.all(-1))  # [B, T, Hkv]
        reached = (bad.cumsum(1) > 0).repeat_interleave(call.hq // call.hkv, 2).unsqueeze(-1)  # [B, T, Hq, 1]
        zero = torch.zeros((), dtype=k.dtype, device=k.device)
        k, v = torch.where(fin_k, k, zero), torch.where(fin_v, v, zero)
    out = F.scaled_dot_product_attention(
        call.q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        is_causal=is_causal, scale=call.scale, enable_gqa=call.hq != call.hkv,
    ).transpose(1, 2)
    if reached is not None:
        out = out.masked_fill(reached, float("nan"))
    return finish(call, out, None)
