"""Rotary position embedding (RoFormer), with a base `theta` and partial rotary.

The NeoX / Llama convention: the first `rotary_dim` channels of a head are split in two halves
`(x1, x2)` and rotated as `(x1 cos - x2 sin, x2 cos + x1 sin)` with frequencies
`theta ** (-2i / rotary_dim)`; the remaining channels pass through unchanged (partial rotary, as
GPT-NeoX, Phi and GLM use). Positions are absolute token indices, so a decode step at position
`t` rotates exactly as the full forward does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from ..core.contract import AttnkitError, OptionError


@dataclass(frozen=True)
class RoPE:
    """RoPE settings: `theta` (base) and `fraction` of each head's channels that rotate."""

    theta: float = 10000.0
    fraction: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)) or not self.theta > 1:
            raise OptionError(f"rope.theta: expected a float > 1, got {self.theta!r}")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise OptionError(f"rope.fraction: expected a float in (0, 1], got {self.fraction!r}")

    def rotary_dim(self, head_dim: int) -> int:
        """Channels that rotate: `fraction * head_dim` rounded down to an even number (>= 2)."""
        dim = int(head_dim * self.fraction) // 2 * 2
        if dim < 2:
            raise OptionError(f"rope.fraction: {self.fraction} of head_dim {head_dim} leaves fewer than 2 rotary channels")
        return dim


RopeArg = Union[RoPE, dict, None, bool]


def as_rope(rope: Any) -> Optional[RoPE]:
    """Normalise the `rope=` argument: a `RoPE`, a dict of its fields, `True` (defaults), or
    `None`/`False` (no position embedding)."""
    if rope is None or rope is False:
        return None
    if rope is True:
        return RoPE()
    if isinstance(rope, RoPE):
        return rope
    if isinstance(rope, dict):
        unknown = sorted(set(rope) - {"theta", "fraction"})
        if unknown:
            raise OptionError(f"rope: unknown field {unknown[0]!r} (fields: theta, fraction)")
        return RoPE(**rope)
    raise OptionError(f"rope: expected a RoPE, a dict, True or None, got {type(rope).__name__}")


def rope_angles(positions: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[..., rotary_dim // 2]` (float32, or float64 for exactness) for integer `positions`."""
    inv_freq = theta ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=positions.device) / rotary_dim)
    ang = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, rope: RoPE) -> torch.Tensor:
    """Rotate `x: [B, T, H, D]` at `positions: [B, T]` or `[T]` (token indices)."""
    if positions.dim() not in (1, 2) or positions.shape[-1] != x.shape[1]:
        raise AttnkitError(f"positions: expected [T] or [B, T] with T={x.shape[1]}, got shape {tuple(positions.shape)}")
    rd = rope.rotary_dim(x.shape[-1])
    cos, sin = rope_angles(positions, rd, rope.theta)  # [(B,) T, rd/2]
    cos = cos.to(x.dtype if x.dtype == torch.float64 else torch.float32).unsqueeze(-2)  # [(B,) T, 1, rd/2]
    sin = sin.to(cos.dtype).unsqueeze(-2)
    rot, rest = x[..., :rd], x[..., rd:]
    x1, x2 = rot[..., : rd // 2].to(cos.dtype), rot[..., rd // 2 :].to(cos.dtype)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out
