"""Run a validated call on one of the family's three forms: fla, PyTorch chunked, recurrent.

Each method module validates its own gates, then hands the tensors here. The forms are backends
declared as data and chosen by the one dispatcher (`ops.dispatch`), so `attnkit.explain` gives
every form's reasons for a direct call (`explain` below). `backend`: `"auto"` (fla when
importable, the tensors are on CUDA and fla has the method's options, else `"chunk"`), `"fla"`,
`"chunk"` (the PyTorch chunked form) or `"reference"` (the token-by-token recurrence).
With the environment variable ATTNKIT_LINEAR_COMPILE=1, `"chunk"` on CUDA runs the chunked
engine through `torch.compile` (see `chunk.engine_for`).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..core.contract import AttentionCall, AttnkitError
from ..ops.dispatch import Backend, Explanation, pick
from .chunk import engine_for
from .common import (
    check_chunk_size,
    check_flag,
    check_qkv,
    check_state,
    check_varlen,
    fail,
    num_states,
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


@dataclass(frozen=True)
class Forms:
    """What a direct call hands its backend besides q, k, v: the gates, the state and, for fla,
    the method's own fla call (None with the reason fla has no equivalent of these options)."""

    g: Optional[torch.Tensor]
    beta: Optional[torch.Tensor]
    initial_state: Optional[torch.Tensor]
    chunk_size: int
    fla: Optional[FlaCall]
    no_fla: str = "fla has no equivalent of these options"


def _run_fla(call: AttentionCall, f: Forms) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    assert f.fla is not None  # `_fla_supports` refused the call otherwise
    return f.fla(call.scale, call.cu_seqlens)


def _run_chunk(call: AttentionCall, f: Forms) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    engine = engine_for(call.q)  # chunk_forward, or torch.compile'd with ATTNKIT_LINEAR_COMPILE on CUDA

    def batched(q, k, v, g, beta, h0):  # type: ignore[no-untyped-def]
        return engine(q, k, v, g, beta, call.scale, h0, f.chunk_size)

    tokens = [call.q, call.k, call.v, f.g, f.beta]
    if call.cu_seqlens is None:
        return batched(*tokens, f.initial_state)
    return run_varlen(batched, call.cu_seqlens, tokens, f.initial_state)


def _run_reference(call: AttentionCall, f: Forms) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    def loop(q, k, v, g, beta, h0):  # type: ignore[no-untyped-def]
        return recurrent_forward(q, k, v, g, beta, call.scale, h0)

    tokens = [call.q, call.k, call.v, f.g, f.beta]
    if call.cu_seqlens is None:
        return loop(*tokens, f.initial_state)
    return run_per_sequence(loop, call.cu_seqlens, tokens, f.initial_state)


def _fla_supports(call: AttentionCall, f: Forms) -> Optional[str]:
    return f.no_fla if f.fla is None else None


# in preference order; every form has varlen and backward, none a softmax LSE
DECLARED = (
    Backend("fla", _run_fla, devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32), lse=False,
            requires=("fla",), supports=_fla_supports),
    Backend("chunk", _run_chunk, lse=False),
    Backend("reference", _run_reference, lse=False),
)
BACKENDS = tuple(b.name for b in DECLARED)

# set while `explain` runs an op: `run_forms` then stops after choosing, before any computation
_EXPLAINING: ContextVar[bool] = ContextVar("attnkit_linear_explaining", default=False)


class _Chosen(Exception):
    def __init__(self, exp: Explanation) -> None:
        self.exp = exp


def run_forms(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    *,
    op: str,
    scale: float,
    initial_state: Optional[torch.Tensor],
    output_final_state: bool,
    cu_seqlens: Optional[torch.Tensor],
    chunk_size: int,
    backend: str,
    fla: Optional[FlaCall],
    no_fla: Optional[str] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Choose the form of op `op` (`linear.<name>`) and run it on validated inputs (q and k already
    L2-normalised where asked, except for fla)."""
    call = AttentionCall(q, k, v, causal=True, scale=scale, cu_seqlens=cu_seqlens, return_lse=False)
    forms = Forms(g, beta, initial_state, chunk_size, fla, no_fla or Forms.no_fla)
    chosen, exp = pick(op, DECLARED, call, forms, backend)
    if _EXPLAINING.get():
        raise _Chosen(exp)
    o, state = chosen.run(call, forms)
    return o, (state if output_final_state else None)


def explain(op: str, *args: Any, **kwargs: Any) -> Explanation:
    """Which form `attnkit.linear.<op>(*args, **kwargs)` would run, and why the others would not.

    The op itself runs, up to its choice of form: the same validation and the same dispatch as
    the call, so the answer cannot drift from what the call does; nothing is computed."""
    from . import OPS

    if op not in OPS:
        raise AttnkitError(f"op: expected one of {sorted(OPS)}, got {op!r}")
    token = _EXPLAINING.set(True)
    try:
        OPS[op](*args, **kwargs)
    except _Chosen as chosen:
        return chosen.exp
    finally:
        _EXPLAINING.reset(token)
    raise AssertionError(f"linear.{op} returned without choosing a form")  # every op reaches run_forms


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
