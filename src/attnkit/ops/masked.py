"""The masked executor: softmax attention restricted by a mask predicate (`core.masks`)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..core.contract import AttentionCall, AttnkitError, validate_attention
from ..core.masks import Mask
from ._backends import run_reference
from ._flex import flex_why_not_mask, run_flex_mask
from .dispatch import Backend, Explanation, pick

DECLARED = (
    Backend("flex", run_flex_mask, auto_devices=("cuda",), requires=("flex",), supports=flex_why_not_mask),
    Backend("reference", lambda call, mask: run_reference(call, mask=mask)),
)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Mask,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Any:
    """Attention where key j is visible to query i iff `mask(b, h, i, j)` (and causality).

    `mask` is a predicate from `attnkit.core.masks` (compose with `&`, `|`, `~`); it is evaluated
    tile by tile, never as a `Tq x Tk` tensor. Backends: `flex` (FlexAttention with a block mask
    compiled from the predicate, CUDA only, no varlen) and `reference`; `auto` takes `flex` on
    CUDA when it can serve the call.
    """
    chosen, _, call, mask = plan(q, k, v, mask, causal=causal, scale=scale, cu_seqlens=cu_seqlens,
                                 return_lse=return_lse, backend=backend)
    return chosen.run(call, mask)


def plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, *, causal: bool = True,
         scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None, return_lse: bool = False,
         backend: str = "auto") -> tuple[Backend, Explanation, AttentionCall, Mask]:
    """Validate a `masked_attention` call and pick its backend (`attnkit.explain` shows the decision)."""
    call = validate_attention(q, k, v, causal=causal, scale=scale, cu_seqlens=cu_seqlens, return_lse=return_lse)
    if not isinstance(mask, Mask):
        raise AttnkitError(f"mask: expected an attnkit.core.masks.Mask predicate, got {type(mask).__name__}")
    chosen, exp = pick("ops.masked_attention", DECLARED, call, mask, backend)
    return chosen, exp, call, mask
