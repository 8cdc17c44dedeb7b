"""The dense executor: exact softmax attention, the baseline every mechanism is measured against."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..core.contract import AttentionCall, validate_attention
from ._backends import run_empty, run_reference, run_sdpa, sdpa_why_not
from .dispatch import Backend, Explanation, pick

DECLARED = (
    Backend("sdpa", lambda call, opts: run_sdpa(call), lse=False, varlen=False,
            supports=lambda call, opts: sdpa_why_not(call)),
    Backend("reference", lambda call, opts: run_reference(call)),
)
BACKENDS = tuple(b.name for b in DECLARED)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Any:
    """Exact attention. `q: [B, Tq, Hq, D]`, `k: [B, Tk, Hkv, D]`, `v: [B, Tk, Hkv, Dv]`.

    Returns `out [B, Tq, Hq, Dv]` or `(out, lse [B, Hq, Tq])`. Backends: `sdpa` (PyTorch SDPA:
    no LSE, no varlen, causal only when Tq == Tk or Tq == 1) and `reference` (blockwise, O(T)
    memory, everything). `auto` takes `sdpa` when it can serve the call.
    """
    chosen, _, call = plan(q, k, v, causal=causal, scale=scale, cu_seqlens=cu_seqlens, return_lse=return_lse,
                           backend=backend)
    if call.empty:  # no query or no key, as SDPA: an empty output, or zeros (LSE -inf)
        return run_empty(call)
    return chosen.run(call, None)


def plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, scale: Optional[float] = None,
         cu_seqlens: Optional[torch.Tensor] = None, return_lse: bool = False,
         backend: str = "auto") -> tuple[Backend, Explanation, AttentionCall]:
    """Validate a `dense_attention` call and pick its backend (`attnkit.explain` shows the decision)."""
    call = validate_attention(q, k, v, causal=causal, scale=scale, cu_seqlens=cu_seqlens, return_lse=return_lse,
                              allow_empty=True)
    chosen, exp = pick("ops.dense_attention", DECLARED, call, None, backend)
    return chosen, exp, call
