"""Gated Linear Attention (Yang et al., "Gated Linear Attention Transformers with
Hardware-Efficient Training", ICML 2024): a data-dependent decay per key channel.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T          o_t = S_t^T (scale * q_t)

`g: [B, T, H, K]` in log space (<= 0; the paper uses `logsigmoid(x W) / 16`).
fla name: `chunk_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import check_gate, check_qkv
from .dispatch import as_token, check_common, check_step, run_forms, step_forms


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """GLA. q, k, g: [B, T, H, K]; v: [B, T, H, V]. Returns (o [B, T, H, V], state [N, H, K, V] or None)."""
    B, T, H, K, V = check_qkv(q, k, v)
    scale, cu_seqlens = check_common(q, scale, initial_state, output_final_state, cu_seqlens, chunk_size, H, K, V)
    check_gate("g", g, (B, T, H, K), q, "[B, T, H, K]")

    def fla_call(scale: float, cu: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        from fla.ops.gla import chunk_gla

        return chunk_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=None if cu is None else cu.long())

    return run_forms(q, k, v, g, None, op="linear.gla", scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                     backend=backend, fla=fla_call)


def gla_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The token-by-token reference of `gla` (float64-capable)."""
    return gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens=cu_seqlens, backend="reference")


def gla_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one token: q, k, g [B, 1, H, K] (or [B, H, K]); v [B, 1, H, V]; state [B, H, K, V].
    Returns (o, new state). O(K V) per head."""
    q, k, v, state, scale, had_t = check_step(q, k, v, state, scale)
    g = check_gate("g", as_token("g", g, q.shape[0], "[B, 1, H, K]", 3), tuple(q.shape), q, "[B, H, K]")
    return step_forms(q, k, v, g, None, state, scale, had_t)
