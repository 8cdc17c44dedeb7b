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
    out = F.scaled_dot_product_attention(
        call.q.transpose(1, 2), call.k.transpose(1, 2), call.v.transpose(1, 2),
        is_causal=is_causal, scale=call.scale, enable_gqa=call.hq != call.hkv,
    )
    return finish(call, out.transpose(1, 2), None)
