"""Short causal depthwise convolution (H3, Mamba; fla's `ShortConvolution`) over time.

`y_t = act(sum_{j < W} w_j * x_{t-j})` per channel, with `x_{t-j} = 0` before the sequence start
(and across varlen boundaries). For decoding, the last `W - 1` inputs are the state, so a step
sees the same window as the full forward. Written as `W` shifted products: no im2col, O(T W C).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_int
from ..core.contract import AttnkitError


class ShortConvolution(nn.Module):
    """Depthwise causal conv of width `kernel_size` on `[B, T, C]`, SiLU activation by default."""

    def __init__(self, channels: int, kernel_size: int = 4, activation: Optional[str] = "silu") -> None:
        super().__init__()
        self.channels = check_int("channels", channels)
        self.kernel_size = check_int("kernel_size", kernel_size)
        if activation not in (None, "silu"):
            raise AttnkitError(f"activation: expected 'silu' or None, got {activation!r}")
        self.activation = activation
        # weight[c, j]: tap on x_{t-j}
        self.weight = nn.Parameter(torch.randn(channels, kernel_size) / kernel_size ** 0.5)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(
        self, x: torch.Tensor, state: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, C], state: [B, W - 1, C] (previous inputs, oldest first) or None.
        Returns (y [B, T, C], new state [B, W - 1, C])."""
        B, T, C = x.shape
        W = self.kernel_size
        prev = x.new_zeros(B, W - 1, C) if state is None else state.to(x.dtype)
        xp = torch.cat([prev, x], dim=1)  # [B, W - 1 + T, C]
        seq_start = None
        if cu_seqlens is not None:
            cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
            seq_start = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=T)  # [T]
        t = torch.arange(T, device=x.device)
        y = self.bias.to(x.dtype).expand(B, T, C)
        for j in range(W):
            tap = xp[:, W - 1 - j : W - 1 - j + T]  # x_{t-j}
            if seq_start is not None:
                tap = tap * (t - j >= seq_start).to(x.dtype).view(1, T, 1)
            y = y + tap * self.weight[:, j].to(x.dtype)
        if self.activation == "silu":
            y = F.silu(y)
        return y, xp[:, xp.shape[1] - (W - 1):] if W > 1 else x.new_zeros(B, 0, C)
