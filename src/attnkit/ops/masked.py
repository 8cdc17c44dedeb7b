"""The masked executor: softmax attention restricted by a mask predicate (`core.masks`)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..core.contract import AttnkitError, validate_attention
from ..core.masks import Mask
from ._backends import run_reference


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
    tile by tile, never as a `Tq x Tk` tensor. Backend: `reference` (the `flex` and `triton`
    backends arrive with the GPU executors).
    """
    call = validate_attention(q, k, v, causal=causal, scale=scale, cu_seqlens=cu_seqlens, return_lse=return_lse)
    if not isinstance(mask, Mask):
        raise AttnkitError(f"mask: expected an attnkit.core.masks.Mask predicate, got {type(mask).__name__}")
    if backend not in ("auto", "reference"):
        raise AttnkitError(f"backend: expected 'auto' or 'reference', got {backend!r}")
    return run_reference(call, mask=mask)
