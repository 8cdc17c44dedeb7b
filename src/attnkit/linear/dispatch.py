"""Run a validated call on one of the family's three forms: fla, PyTorch chunked, recurrent.

Each method module validates its own gates, then hands the tensors here. `backend`:
`"auto"` (fla when importable and the tensors are on CUDA, else `"chunk"`), `"fla"`,
`"chunk"` (the PyTorch chunked form) or `"reference"` (the token-by-token recurrence).
With the environment variable ATTNKIT_LINEAR_COMPILE=1, `"chunk"` on CUDA runs the chunked
engine through `torch.compile` (see `chunk.engine_for`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .chunk import engine_for
from .common import (
    check_chunk_size,
    check_flag,
    check_qkv,
    check_state,
    check_varlen,
    fail,
    num_states,
    pick_backend,
    resolve_scale,
    run_per_sequence,
    run_varlen,
)
from .recurrent import recurrent_forward, recurrent_step

FlaCall = Callable[[float, Optional[torch.Tensor]], tuple[torch.Tensor, Optional[torch.Tensor]]]


def check_common(
    q: torch.Tensor,
    scale: object,
    initial_state: object,
    output_final_state: object,
    cu_seqlens: Optional[torch.Tensor],
    chunk_size: object,
    H: int,
    K: int,
    V: int,
) -> tuple[float, Optional[torch.Tensor]]:
    """Checks shared by every method: scale, state, flags, varlen offsets, chunk size."""
    scale = resolve_scale(scale, K)
    check_flag("output_final_state", output_final_state)
    check_chunk_size(chunk_size)
    cu_seqlens = check_varlen(cu_seqlens, q)
    if initial_state is not None:
        check_state("initial_state", initial_state, (num_states(q.shape[0], cu_seqlens), H, K, V), q)
    return scale, cu_seqlens


def run_forms(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    *,
    scale: float,
    initial_state: Optional[torch.Tensor],
    output_final_state: bool,
    cu_seqlens: Optional[torch.Tensor],
    chunk_size: int,
    backend: str,
    fla: Optional[FlaCall],
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Dispatch validated inputs (q and k already L2-normalised where asked, except for fla)."""
    chosen = pick_backend(backend, q)
    if chosen == "fla" and fla is None and backend == "auto":
        chosen = "chunk"
    if chosen == "fla":
        if fla is None:
            raise fail("backend", "'chunk' or 'reference' for these options", "'fla' (fla has no equivalent)")
        o, state = fla(scale, cu_seqlens)
        return o, (state if output_final_state else None)
    tokens = [q, k, v, g, beta]

    if chosen == "chunk":
        engine = engine_for(q)  # chunk_forward, or torch.compile'd with ATTNKIT_LINEAR_COMPILE on CUDA

        def batched(q, k, v, g, beta, h0):  # type: ignore[no-untyped-def]
            return engine(q, k, v, g, beta, scale, h0, chunk_size)

        if cu_seqlens is None:
            o, state = batched(*tokens, initial_state)
        else:
            o, state = run_varlen(batched, cu_seqlens, tokens, initial_state)
    else:
        def loop(q, k, v, g, beta, h0):  # type: ignore[no-untyped-def]
            return recurrent_forward(q, k, v, g, beta, scale, h0)

        if cu_seqlens is None:
            o, state = loop(*tokens, initial_state)
        else:
            o, state = run_per_sequence(loop, cu_seqlens, tokens, initial_state)
    return o, (state if output_final_state else None)


def as_token(name: str, x: object, B: Optional[int], layout: str, ndim: int) -> torch.Tensor:
    """Accept one decode token as [B, 1, H, ...] or [B, H, ...]; return [B, H, ...]."""
    if not isinstance(x, torch.Tensor):
        raise fail(name, f"a torch.Tensor {layout}", type(x).__name__)
    if x.dim() == ndim + 1:
        if x.shape[1] != 1:
            raise fail(name, f"one token: {layout} with T == 1, or the same without the T axis", f"shape {tuple(x.shape)}")
        x = x[:, 0]
    elif x.dim() != ndim:
        raise fail(name, f"{layout} (T == 1) or without the T axis", f"shape {tuple(x.shape)}")
    if B is not None and x.shape[0] != B:
        raise fail(name, f"batch {B} (same as q)", f"shape {tuple(x.shape)}")
    return x


def step_forms(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    state: Optional[torch.Tensor],
    scale: float,
    had_time_axis: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step on validated [B, H, ...] tokens; output in q's layout and dtype."""
    B, H, K = q.shape
    V = v.shape[-1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    S = q.new_zeros(B, H, K, V, dtype=dt) if state is None else state.to(dt)
    o, S = recurrent_step(q, k, v, g, beta, S, scale)
    o = o.to(q.dtype)
    return (o[:, None] if had_time_axis else o), S


def check_step(
    q: object, k: object, v: object, state: object, scale: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], float, bool]:
    """Validate one decode token: q, k [B, 1, H, K] or [B, H, K]; v likewise with V; state
    None or [B, H, K, V] float32/float64. Returns (q, k, v) as [B, H, ...], state, scale and
    whether the inputs had a T axis."""
    had_time_axis = isinstance(q, torch.Tensor) and q.dim() == 4
    qt = as_token("q", q, None, "[B, 1, H, K]", 3)
    kt = as_token("k", k, qt.shape[0], "[B, 1, H, K]", 3)
    vt = as_token("v", v, qt.shape[0], "[B, 1, H, V]", 3)
    B, _, H, K, V = check_qkv(qt[:, None], kt[:, None], vt[:, None])
    if state is not None:
        check_state("state", state, (B, H, K, V), qt)
    return qt, kt, vt, state, resolve_scale(scale, K), had_time_axis  # type: ignore[return-value]
