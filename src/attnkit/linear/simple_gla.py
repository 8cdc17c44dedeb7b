"""Simple GLA: one scalar decay per head and token (RetNet, Lightning Attention, mLSTM-style).

    S_t = exp(g_t) S_{t-1} + k_t v_t^T          o_t = S_t^T (scale * q_t)

`g: [B, T, H]` is data-dependent (log space, <= 0); `g_gamma: [H]` is a constant per-head decay
(retention / Lightning Attention: Sun et al., "Retentive Network", 2023; Qin et al.,
"Lightning Attention-2", 2024). fla names: `chunk_simple_gla`, `chunk_lightning_attn`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import check_gate, check_qkv, fail
from .dispatch import as_token, check_common, check_step, run_forms, step_forms


def _check_g_gamma(g_gamma: object, H: int, q: torch.Tensor) -> torch.Tensor:
    return check_gate("g_gamma", g_gamma, (H,), q, "[H]")


def simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    g_gamma: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scalar-gated linear attention. q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] or
    g_gamma: [H] (at most one; neither means no decay). Returns (o [B, T, H, V], state)."""
    B, T, H, K, V = check_qkv(q, k, v)
    scale, cu_seqlens = check_common(q, scale, initial_state, output_final_state, cu_seqlens, chunk_size, H, K, V)
    if g is not None and g_gamma is not None:
        raise fail("g_gamma", "None when g is given (pass one of g [B, T, H] or g_gamma [H])", "a tensor")
    if g is not None:
        check_gate("g", g, (B, T, H), q, "[B, T, H]")
    if g_gamma is not None:
        _check_g_gamma(g_gamma, H, q)

    def fla_call(scale: float, cu: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        from fla.ops.simple_gla import chunk_simple_gla

        return chunk_simple_gla(q, k, v, g=g, g_gamma=g_gamma, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=None if cu is None else cu.long())

    g_eff = g if g_gamma is None else g_gamma.to(q.device)[None, None, :].expand(B, T, H)
    return run_forms(q, k, v, g_eff, None, op="linear.simple_gla", scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                     backend=backend, fla=fla_call)


def simple_gla_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    g_gamma: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The token-by-token reference of `simple_gla` (float64-capable)."""
    return simple_gla(q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                      cu_seqlens=cu_seqlens, backend="reference")


def simple_gla_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    state: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    g_gamma: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one token: q, k [B, 1, H, K] (or [B, H, K]); g [B, 1, H] (or [B, H]) or g_gamma [H];
    state [B, H, K, V]. Returns (o, new state). O(K V) per head."""
    q, k, v, state, scale, had_t = check_step(q, k, v, state, scale)
    B, H = q.shape[:2]
    if g is not None and g_gamma is not None:
        raise fail("g_gamma", "None when g is given (pass one of g or g_gamma)", "a tensor")
    if g is not None:
        g = check_gate("g", as_token("g", g, B, "[B, 1, H]", 2), (B, H), q, "[B, H]")
    elif g_gamma is not None:
        g = _check_g_gamma(g_gamma, H, q)[None].expand(B, H)
    return step_forms(q, k, v, g, None, state, scale, had_t)


# --- Lightning Attention: simple GLA with fla's constant per-head decay ----------------------


def lightning_decay(num_heads: int, layer_idx: int, num_layers: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """fla's per-head constant log decay for Lightning Attention: `g_gamma [H]` float32,
    `-(8 / H) * (1 - layer_idx / num_layers) * h` for head h (head 0 does not decay)."""
    for name, val in (("layer_idx", layer_idx), ("num_layers", num_layers), ("num_heads", num_heads)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise fail(name, "an int", type(val).__name__)
    if num_layers < 1:
        raise fail("num_layers", "an int >= 1", num_layers)
    if not 0 <= layer_idx < num_layers:
        raise fail("layer_idx", f"an int in [0, num_layers={num_layers})", layer_idx)
    h = torch.arange(num_heads, dtype=torch.float32, device=device)
    return -(8.0 / num_heads) * (1.0 - layer_idx / num_layers) * h


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_idx: int,
    num_layers: int,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Lightning Attention (Qin et al., 2024) as fla's `chunk_lightning_attn`: `simple_gla` with
    `g_gamma = lightning_decay(H, layer_idx, num_layers)`."""
    check_qkv(q, k, v)
    g_gamma = lightning_decay(q.shape[2], layer_idx, num_layers, q.device)
    return simple_gla(q, k, v, None, g_gamma, scale, initial_state, output_final_state,
                      cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend)
