"""The delta-rule family: DeltaNet, Gated DeltaNet, Kimi Delta Attention.

The state is a fast-weight memory corrected by one step of online regression per token
(Schlag et al., 2021; Yang et al., "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length", NeurIPS 2024). With `S'_t = diag(exp(g_t)) S_{t-1}`:

    S_t = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T          o_t = S_t^T (scale * q_t)

    delta_rule:        no decay (g = 0)                    fla: chunk_delta_rule
    gated_delta_rule:  g: [B, T, H] scalar per head        fla: chunk_gated_delta_rule
                       (Yang et al., "Gated Delta Networks", ICLR 2025)
    kda:               g: [B, T, H, K] per key channel     fla: chunk_kda
                       (Kimi Team, "Kimi Linear", 2025)

`beta: [B, T, H]` in [0, 1] multiplies the correction `v_t - S'^T k_t` (fla's convention).
The recurrence is contractive when `||k_t|| <= 1`; `use_qk_l2norm_in_kernel=True` L2-normalises
q and k first, as fla does. The chunked form uses the WY / UT representation (see `chunk.py`).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from .common import check_beta, check_flag, check_gate, check_qkv, l2norm
from .dispatch import as_token, check_common, check_step, run_forms, step_forms

FLA_KDA_MAX_HEAD_DIM = 256  # fla's chunk_kda asserts K <= 256


def warn_if_expanding(k: torch.Tensor, beta: torch.Tensor) -> None:
    """Warn when a delta step can expand the state: `I - beta_t k_t k_t^T` has the eigenvalue
    `1 - beta_t ||k_t||^2`, below -1 once `beta ||k||^2 > 2`, and repeated such steps overflow to
    inf, then NaN. Raw (unnormalised) keys do that; fla, whose default is the same, returns the NaN
    silently. Not an error: a short sequence or a later decay can stay finite."""
    worst = float((beta.detach().double() * k.detach().double().square().sum(-1)).amax()) if k.numel() else 0.0
    if worst > 2.0:
        warnings.warn(f"k: beta * ||k||^2 reaches {worst:.3g} > 2, so the delta rule's state can grow without "
                      "bound and the output overflow to inf/NaN; pass use_qk_l2norm_in_kernel=True or "
                      "L2-normalise k", RuntimeWarning, stacklevel=3)


def _delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    beta: torch.Tensor,
    gate: Optional[str],
    scale: Optional[float],
    initial_state: Optional[torch.Tensor],
    output_final_state: bool,
    cu_seqlens: Optional[torch.Tensor],
    use_qk_l2norm_in_kernel: bool,
    chunk_size: int,
    backend: str,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    B, T, H, K, V = check_qkv(q, k, v)
    scale, cu_seqlens = check_common(q, scale, initial_state, output_final_state, cu_seqlens, chunk_size, H, K, V)
    check_flag("use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel)
    if gate == "scalar":
        check_gate("g", g, (B, T, H), q, "[B, T, H]")
    elif gate == "vector":
        check_gate("g", g, (B, T, H, K), q, "[B, T, H, K]")
    check_beta(beta, (B, T, H), q)

    def fla_call(scale: float, cu: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        cu = None if cu is None else cu.long()
        common = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                      cu_seqlens=cu, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
        if gate is None:
            from fla.ops.delta_rule import chunk_delta_rule

            return chunk_delta_rule(q, k, v, beta, **common)
        if gate == "scalar":
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            return chunk_gated_delta_rule(q, k, v, g, beta, **common)
        from fla.ops.kda import chunk_kda

        return chunk_kda(q, k, v, g, beta, **common)

    if not use_qk_l2norm_in_kernel:
        warn_if_expanding(k, beta)
    qn, kn = (l2norm(q), l2norm(k)) if use_qk_l2norm_in_kernel else (q, k)
    op = {None: "linear.delta_rule", "scalar": "linear.gated_delta_rule", "vector": "linear.kda"}[gate]
    fla_head_dim = FLA_KDA_MAX_HEAD_DIM if gate == "vector" else None
    return run_forms(qn, kn, v, g, beta, op=op, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                     backend=backend, fla=None if fla_head_dim and K > fla_head_dim else fla_call,
                     no_fla=f"fla's kda supports head dim K <= {fla_head_dim}, got K={K}")


def _delta_step(q, k, v, g, beta, gate, state, scale, use_qk_l2norm_in_kernel):  # type: ignore[no-untyped-def]
    q, k, v, state, scale, had_t = check_step(q, k, v, state, scale)
    B, H, K = q.shape
    check_flag("use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel)
    if gate == "scalar":
        g = check_gate("g", as_token("g", g, B, "[B, 1, H]", 2), (B, H), q, "[B, H]")
    elif gate == "vector":
        g = check_gate("g", as_token("g", g, B, "[B, 1, H, K]", 3), (B, H, K), q, "[B, H, K]")
    beta = check_beta(as_token("beta", beta, B, "[B, 1, H]", 2), (B, H), q)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    else:
        warn_if_expanding(k, beta)
    return step_forms(q, k, v, g, beta, state, scale, had_t)


# --- DeltaNet ---------------------------------------------------------------------------------


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_qk_l2norm_in_kernel: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """DeltaNet. q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H] in [0, 1].
    Returns (o [B, T, H, V], state [N, H, K, V] or None)."""
    return _delta(q, k, v, None, beta, None, scale, initial_state, output_final_state, cu_seqlens,
                  use_qk_l2norm_in_kernel, chunk_size, backend)


def delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The token-by-token reference of `delta_rule` (float64-capable)."""
    return delta_rule(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens=cu_seqlens,
                      use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, backend="reference")


def delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    state: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one token: q, k [B, 1, H, K] (or [B, H, K]); beta [B, 1, H] (or [B, H]);
    state [B, H, K, V]. Returns (o, new state). O(K V) per head."""
    return _delta_step(q, k, v, None, beta, None, state, scale, use_qk_l2norm_in_kernel)


# --- Gated DeltaNet ---------------------------------------------------------------------------


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_qk_l2norm_in_kernel: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gated DeltaNet. q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] (log space);
    beta: [B, T, H]. Returns (o [B, T, H, V], state [N, H, K, V] or None)."""
    return _delta(q, k, v, g, beta, "scalar", scale, initial_state, output_final_state, cu_seqlens,
                  use_qk_l2norm_in_kernel, chunk_size, backend)


def gated_delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The token-by-token reference of `gated_delta_rule` (float64-capable)."""
    return gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens=cu_seqlens,
                            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, backend="reference")


def gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one token: q, k [B, 1, H, K]; g, beta [B, 1, H] (or without the T axis);
    state [B, H, K, V]. Returns (o, new state). O(K V) per head."""
    return _delta_step(q, k, v, g, beta, "scalar", state, scale, use_qk_l2norm_in_kernel)


# --- Kimi Delta Attention ---------------------------------------------------------------------


def kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_qk_l2norm_in_kernel: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Kimi Delta Attention. q, k, g: [B, T, H, K] (g in log space); v: [B, T, H, V];
    beta: [B, T, H]. Returns (o [B, T, H, V], state [N, H, K, V] or None)."""
    return _delta(q, k, v, g, beta, "vector", scale, initial_state, output_final_state, cu_seqlens,
                  use_qk_l2norm_in_kernel, chunk_size, backend)


def kda_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The token-by-token reference of `kda` (float64-capable)."""
    return kda(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens=cu_seqlens,
               use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, backend="reference")


def kda_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one token: q, k, g [B, 1, H, K]; beta [B, 1, H] (or without the T axis);
    state [B, H, K, V]. Returns (o, new state). O(K V) per head."""
    return _delta_step(q, k, v, g, beta, "vector", state, scale, use_qk_l2norm_in_kernel)
