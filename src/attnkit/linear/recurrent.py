"""The defining recurrence, one token at a time: the oracle of the family and its decode step.

Per head, with state `S: [K, V]`, log-space decay `g_t` (none, scalar, or per key channel) and,
for the delta family, step size `beta_t`:

    S'_t = diag(exp(g_t)) S_{t-1}
    S_t  = S'_t + k_t v_t^T                               (linear attention, simple GLA, GLA)
    S_t  = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T          (DeltaNet, Gated DeltaNet, KDA)
    o_t  = S_t^T (scale * q_t)

A step costs O(K V) per head in time and memory, independent of the position: that is what
decoding one token costs for every method of the family.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.contract import compute_dtype


def recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    S: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: q, k: [B, H, K]; v: [B, H, V]; g: None, [B, H] or [B, H, K]; beta: None or [B, H];
    S: [B, H, K, V] in the compute dtype. Returns (o: [B, H, V], S_new), both in S's dtype."""
    dt = S.dtype
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if g is not None:
        S = S * (g[..., None, None] if g.dim() == 2 else g[..., None]).to(dt).exp()
    if beta is None:
        u = v
    else:
        u = beta.to(dt)[..., None] * (v - (k[..., None, :] @ S)[..., 0, :])
    S = torch.addcmul(S, k[..., :, None], u[..., None, :])
    o = ((q * scale)[..., None, :] @ S)[..., 0, :]
    return o, S


def recurrent_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    scale: float,
    initial_state: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token loop. q, k: [B, T, H, K]; v: [B, T, H, V]; g: None, [B, T, H] or
    [B, T, H, K]; beta: None or [B, T, H]. Returns o: [B, T, H, V] in q's dtype and the final
    state [B, H, K, V] (float32, or float64 for float64 inputs)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = compute_dtype(q.dtype)
    S = q.new_zeros(B, H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt)
    outs = []
    for t in range(T):
        o, S = recurrent_step(
            q[:, t], k[:, t], v[:, t], None if g is None else g[:, t], None if beta is None else beta[:, t], S, scale
        )
        outs.append(o)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V, dtype=dt)
    return o.to(q.dtype), S
