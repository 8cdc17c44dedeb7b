"""The sparse executor: softmax attention over the keys a `KVSelection` lists."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..core.contract import AttentionCall, AttnkitError, seq_lengths, validate_attention
from ..core.masks import Mask
from ..core.selection import KVSelection
from ._backends import run_reference
from ._flex import flex_why_not_selection, run_flex_selection
from ._triton import run_triton, triton_why_not

BACKENDS = ("triton", "flex", "reference")


def validate_selection(call: AttentionCall, selection: object) -> KVSelection:
    """Check a selection against the call (per-sequence sizes under varlen)."""
    if not isinstance(selection, KVSelection):
        raise AttnkitError(f"selection: expected an attnkit KVSelection, got {type(selection).__name__}")
    if call.varlen:
        longest = max(seq_lengths(call.cu_seqlens))
        return selection.validate(call.num_seqs, call.hq, call.hkv, longest, longest)
    return selection.validate(call.batch, call.hq, call.hkv, call.tq, call.tk)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: KVSelection,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    mask: Optional[Mask] = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Any:
    """Attention of each query over the key blocks its selection row lists (DESIGN.md section 4).

    With `causal=True` the causal rule applies token by token inside selected blocks; an optional
    `mask` predicate further restricts visibility. A query whose selection is empty (or fully
    masked) outputs 0 with LSE `-inf`. Backends: `triton` (attnkit's kernels: every selection
    shape, no `mask`; CUDA, or the CPU under TRITON_INTERPRET=1), `flex` (FlexAttention, CUDA,
    `q_block`/`k_block` multiples of 128, masks allowed) and `reference`. `auto` takes `reference`
    on the CPU and, on CUDA, the first of `triton`, `flex` that supports the call.
    """
    call = validate_attention(q, k, v, causal=causal, scale=scale, cu_seqlens=cu_seqlens, return_lse=return_lse)
    selection = validate_selection(call, selection)
    if mask is not None and not isinstance(mask, Mask):
        raise AttnkitError(f"mask: expected an attnkit.core.masks.Mask predicate or None, got {type(mask).__name__}")
    if backend not in ("auto",) + BACKENDS:
        raise AttnkitError(f"backend: expected one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "triton" or (backend == "auto" and call.device.type == "cuda"):
        reason = triton_why_not(call, selection, mask)
        if reason is None:
            return run_triton(call, selection)
        if backend == "triton":
            raise AttnkitError(f"backend: 'triton' cannot serve this call: {reason}")
    if backend == "flex" or (backend == "auto" and call.device.type == "cuda"):
        reason = flex_why_not_selection(call, selection, mask)
        if reason is None:
            return run_flex_selection(call, selection, mask)
        if backend == "flex":
            raise AttnkitError(f"backend: 'flex' cannot serve this call: {reason}")
    return run_reference(call, mask=mask, selection=selection)
