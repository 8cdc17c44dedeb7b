"""The dense executor: exact softmax attention, the baseline every mechanism is measured against."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..core.contract import AttnkitError, validate_attention
from ._backends import run_reference, run_sdpa, sdpa_why_not

BACKENDS = ("sdpa", "reference")


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
    call = validate_attention(q, k, v, causal=causal, scale=scale, cu_seqlens=cu_seqlens, return_lse=return_lse)
    if backend not in ("auto",) + BACKENDS:
        raise AttnkitError(f"backend: expected one of {('auto',) + BACKENDS}, got {backend!r}")
    sdpa_reason = sdpa_why_not(call) or ("no LSE output" if return_lse else None) or (
        "no varlen" if cu_seqlens is not None else None)
    if backend == "sdpa" and sdpa_reason:
        raise AttnkitError(f"backend: 'sdpa' cannot serve this call: {sdpa_reason}")
    if backend in ("auto", "sdpa") and sdpa_reason is None:
        return run_sdpa(call)
    return run_reference(call)
