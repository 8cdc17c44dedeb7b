"""Linear attention (Katharopoulos et al., "Transformers are RNNs", 2020): no decay, no gate.

    S_t = S_{t-1} + k_t v_t^T          o_t = S_t^T (scale * q_t)

with the optional normalisation `o_t / (scale * q_t . z_t)`, `z_t = sum_{s <= t} k_s` (the
running key sum of the sequence). A feature map, if any, is applied by the caller to q and k.
fla name: `chunk_linear_attn` / `fused_recurrent_linear_attn`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.contract import compute_dtype
from .common import check_flag, check_qkv, fail
from .dispatch import check_common, check_step, run_forms, step_forms

NORM_EPS = 1e-10


def _key_sums(k: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """z_t = sum of k_s for s <= t within t's sequence: [B, T, H, K] in the compute dtype."""
    kf = k.to(compute_dtype(k.dtype))
    z = kf.cumsum(1)
    if cu_seqlens is None:
        return z
    cu = cu_seqlens.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    before = torch.cat([z.new_zeros(1, 1, *z.shape[2:]), z[:, :-1]], dim=1)  # sum up to t - 1
    start = torch.repeat_interleave(cu[:-1], lens)  # [T] first token of t's sequence
    return z - before[:, start]


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    normalize: bool = False,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal linear attention. q, k: [B, T, H, K]; v: [B, T, H, V] -> (o [B, T, H, V], state).

    `normalize=True` divides by the running key sum of each sequence; the key sum is not part
    of the `[N, H, K, V]` state, so it cannot be combined with `initial_state` (fla's default is
    `normalize=True`; attnkit's is `False` so that prefill and decode compose).
    """
    B, T, H, K, V = check_qkv(q, k, v)
    scale, cu_seqlens = check_common(q, scale, initial_state, output_final_state, cu_seqlens, chunk_size, H, K, V)
    check_flag("normalize", normalize)
    if normalize and initial_state is not None:
        raise fail("initial_state", "None when normalize=True (the key-sum normaliser is not part of the state)",
                   "a tensor")

    def fla_call(scale: float, cu: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        from fla.ops.simple_gla import chunk_simple_gla  # linear attention = simple GLA without decay

        return chunk_simple_gla(q, k, v, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=None if cu is None else cu.long())

    o, state = run_forms(q, k, v, None, None, op="linear.linear_attention", scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                         backend=backend, fla=None if normalize else fla_call,
                         no_fla="normalize=True is computed by attnkit (running key sum), not by fla")
    if normalize:
        z = _key_sums(k, cu_seqlens)
        denom = (q.to(z.dtype) * scale * z).sum(-1, keepdim=True) + NORM_EPS
        o = (o.to(z.dtype) / denom).to(q.dtype)
    return o, state


def linear_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    normalize: bool = False,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The token-by-token reference of `linear_attention` (float64-capable)."""
    return linear_attention(q, k, v, scale, initial_state, output_final_state, normalize,
                            cu_seqlens=cu_seqlens, backend="reference")


def linear_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one token: q, k [B, 1, H, K] (or [B, H, K]), v likewise, state [B, H, K, V].
    Returns (o in q's layout, new state). O(K V) per head."""
    q, k, v, state, scale, had_t = check_step(q, k, v, state, scale)
    return step_forms(q, k, v, None, None, state, scale, had_t)
