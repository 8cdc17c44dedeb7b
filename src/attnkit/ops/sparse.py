"""The sparse executor: softmax attention over the keys a `KVSelection` lists."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..core.contract import AttentionCall, AttnkitError, seq_lengths, validate_attention
from ..core.masks import Mask
from ..core.selection import KVSelection
from ._backends import run_reference
from ._flex import FLEX_BLOCK, flex_why_not_mask, run_flex_selection
from ._triton import run_triton, triton_why_not
from .dispatch import Backend, Explanation, pick

# opts of a call: (selection, mask)
DECLARED = (
    Backend("triton", lambda call, o: run_triton(call, o[0]), auto_devices=("cuda",), requires=("triton",),
            supports=lambda call, o: triton_why_not(call, o[0], o[1])),
    Backend("flex", lambda call, o: run_flex_selection(call, o[0], o[1]), auto_devices=("cuda",), requires=("flex",),
            block_multiple=FLEX_BLOCK, blocks=lambda o: (o[0].q_block, o[0].k_block),
            supports=lambda call, o: flex_why_not_mask(call, o[1])),
    Backend("reference", lambda call, o: run_reference(call, mask=o[1], selection=o[0])),
)
BACKENDS = tuple(b.name for b in DECLARED)


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
    """Attention of each query over the key blocks its selection row lists.

    See docs/design.md "A sparse method is a selection plus an executor".

    With `causal=True` the causal rule applies token by token inside selected blocks; an optional
    `mask` predicate further restricts visibility. A query whose selection is empty (or fully
    masked) outputs 0 with LSE `-inf`. Backends: `triton` (attnkit's kernels: every selection
    shape, no `mask`; CUDA, or the CPU under TRITON_INTERPRET=1), `flex` (FlexAttention, CUDA,
    `q_block`/`k_block` multiples of 128, masks allowed) and `reference`. `auto` takes `reference`
    on the CPU and, on CUDA, the first of `triton`, `flex` that supports the call.
    """
    chosen, _, call, opts = plan(q, k, v, selection, causal=causal, scale=scale, cu_seqlens=cu_seqlens, mask=mask,
                                 return_lse=return_lse, backend=backend)
    return chosen.run(call, opts)


def plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: KVSelection, *, causal: bool = True,
         scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None, mask: Optional[Mask] = None,
         return_lse: bool = False, backend: str = "auto") -> tuple[Backend, Explanation, AttentionCall, Any]:
    """Validate a `sparse_attention` call and pick its backend (`attnkit.explain` shows the decision)."""
    call = validate_attention(q, k, v, causal=causal, scale=scale, cu_seqlens=cu_seqlens, return_lse=return_lse)
    selection = validate_selection(call, selection)
    if mask is not None and not isinstance(mask, Mask):
        raise AttnkitError(f"mask: expected an attnkit.core.masks.Mask predicate or None, got {type(mask).__name__}")
    opts = (selection, mask)
    chosen, exp = pick("ops.sparse_attention", DECLARED, call, opts, backend)
    return chosen, exp, call, opts
