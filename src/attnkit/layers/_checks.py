"""Argument checks shared by the layers (errors name the argument)."""

from __future__ import annotations

from typing import Optional

import torch

from ..core.checks import check_bool, check_int  # noqa: F401  (the layers' checks)
from ..core.contract import AttnkitError




def check_input(x: object, hidden_size: int) -> torch.Tensor:
    """`x: [B, T, C]` with C == hidden_size."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != hidden_size:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise AttnkitError(f"x: expected [B, T, {hidden_size}], got {shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise AttnkitError(f"x: expected non-empty batch and sequence dims, got {tuple(x.shape)}")
    return x


def positions_for(x: torch.Tensor, offset: int, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """Token positions `[T]`: `offset + arange(T)`, restarting at 0 at each varlen boundary."""
    T = x.shape[1]
    pos = torch.arange(T, device=x.device)
    if cu_seqlens is None:
        return pos + offset
    cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
    lens = cu[1:] - cu[:-1]
    start = torch.repeat_interleave(cu[:-1], lens, output_size=T)
    return pos - start


def check_cache_call(cache: object, cu_seqlens: Optional[torch.Tensor], batch: int) -> None:
    if cache is not None and cu_seqlens is not None:
        raise AttnkitError("cu_seqlens: expected None when decoding with a cache (one sequence per batch row)")
    bs = getattr(cache, "batch_size", None)
    if bs is not None and bs != batch:
        raise AttnkitError(f"cache: holds batch {bs}, got x with batch {batch}")
