"""RazorAttention's retrieval-head scoring: echo and induction scores on a repeated probe.

The probe is a random token sequence of length `period` followed by the same sequence again. For
a query at position `i >= period` (second copy):
- an *echo* head attends to `i - period`, the previous occurrence of its own token;
- an *induction* head attends to `i - period + 1`, the token that followed that occurrence.
A head's score is the attention probability on that target, averaged over the second copy and
the batch. A KV head scores the max over its query heads (its cache serves all of them).
"""

from __future__ import annotations

import math

import torch

from ..core.contract import AttnkitError, OptionError


def head_scores(q: torch.Tensor, k: torch.Tensor, period: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`q: [B, T, Hq, D]`, `k: [B, T, Hkv, D]` (post-RoPE) of a probe with `T >= 2 * period`
    (tokens repeat with that period). Returns `(echo [Hkv], induction [Hkv])` float32."""
    B, T, Hq, D = q.shape
    H = k.shape[2]
    if period < 1 or T < 2 * period:
        raise AttnkitError(f"period: expected 1 <= period and 2 * period <= T={T}, got {period}")
    G = Hq // H
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    i = torch.arange(period, T, device=q.device)  # queries of the repeated part
    qg = q[:, period:].to(cd).view(B, -1, H, G, D).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, Tr, D]
    kk = k.to(cd).permute(0, 2, 1, 3).unsqueeze(2)  # [B, Hkv, 1, T, D]
    s = torch.matmul(qg, kk.transpose(-1, -2)) * scale  # [B, Hkv, G, Tr, T]  (Tr * T, small probe)
    s = s.masked_fill(torch.arange(T, device=q.device).view(1, -1) > i.view(-1, 1), float("-inf"))
    p = torch.softmax(s, -1)
    echo = p.gather(-1, (i - period).view(1, 1, 1, -1, 1).expand(*p.shape[:4], 1)).squeeze(-1)
    ind = p.gather(-1, (i - period + 1).view(1, 1, 1, -1, 1).expand(*p.shape[:4], 1)).squeeze(-1)
    return echo.mean((0, 3)).amax(1).float(), ind.mean((0, 3)).amax(1).float()


def retrieval_heads(echo: torch.Tensor, induction: torch.Tensor, induction_ratio: float = 0.14,
                    echo_ratio: float = 0.01) -> torch.Tensor:
    """Pick retrieval heads across the whole model from scores `[L, Hkv]`: the top
    `ceil(induction_ratio * L * Hkv)` by induction score plus the top `ceil(echo_ratio * L * Hkv)`
    by echo score (the paper protects ~15% of heads). Returns bool `[L, Hkv]`."""
    for name, r in (("induction_ratio", induction_ratio), ("echo_ratio", echo_ratio)):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise OptionError(f"{name}: expected a ratio in [0, 1], got {r!r}")
    if echo.shape != induction.shape or echo.dim() != 2:
        raise AttnkitError(f"echo: expected [L, Hkv] like induction, got {tuple(echo.shape)} vs {tuple(induction.shape)}")
    n = echo.numel()
    out = torch.zeros(n, dtype=torch.bool, device=echo.device)
    for scores, r in ((induction, induction_ratio), (echo, echo_ratio)):
        k = min(n, math.ceil(r * n))
        if k:
            out[scores.flatten().topk(k).indices] = True
    return out.view_as(echo)
