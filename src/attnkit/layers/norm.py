"""Normalisation layers: RMSNorm (Zhang & Sennrich, 2019) and its gated form used as the output
norm of linear-attention layers (`RMSNorm(o) * swish(g)`, as GLA, Gated DeltaNet and KDA do)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """`x / rms(x) * weight` over the last dim, computed in float32 (float64 kept)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(dt)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(dt)
        if gate is not None:  # the gated output norm: RMSNorm(o) * swish(g)
            y = y * F.silu(gate.to(dt))
        return y.to(x.dtype)
