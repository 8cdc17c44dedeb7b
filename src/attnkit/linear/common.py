"""Shared pieces of the linear/recurrent family: validation, varlen packing.

Layout follows fla: sequence-first tensors
    q, k: [B, T, H, K]   v: [B, T, H, V]   o: [B, T, H, V]
gates in log space (`exp(g)` is the per-step decay, so `g <= 0`), states `[N, H, K, V]` in
float32 (float64 when the inputs are float64). With `cu_seqlens` (int32 `[N+1]`), `B == 1` and
the sequences are packed along T; states reset at every boundary and `N` is the number of
sequences. Every error names the argument, what was expected and what was passed.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from ..core.contract import AttnkitError, check_cu_seqlens, compute_dtype, plain_scalar

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fail(arg: str, expected: str, got: object) -> AttnkitError:
    return AttnkitError(f"{arg}: expected {expected}, got {got}")


# --- dtypes -----------------------------------------------------------------------------------


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x / sqrt(sum(x^2) + eps)` over the last dim (fla's `use_qk_l2norm_in_kernel`)."""
    xf = x.to(compute_dtype(x.dtype))
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


# --- validation -------------------------------------------------------------------------------


def _check_float(name: str, t: object, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise fail(name, f"a torch.Tensor {layout}", type(t).__name__)
    if t.dtype not in FLOAT_DTYPES:
        raise fail(name, "dtype float16, bfloat16, float32 or float64", t.dtype)
    return t


def check_qkv(q: object, k: object, v: object) -> tuple[int, int, int, int, int]:
    """q, k: [B, T, H, K], v: [B, T, H, V], one dtype and device. Returns (B, T, H, K, V)."""
    q = _check_float("q", q, "[B, T, H, K]")
    k = _check_float("k", k, "[B, T, H, K]")
    v = _check_float("v", v, "[B, T, H, V]")
    if q.dim() != 4:
        raise fail("q", "4 dims [B, T, H, K]", f"shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise fail(name, f"dtype {q.dtype} (same as q)", t.dtype)
        if t.device != q.device:
            raise fail(name, f"device {q.device} (same as q)", t.device)
    if tuple(k.shape) != tuple(q.shape):
        raise fail("k", f"shape {tuple(q.shape)} (same as q: [B, T, H, K], no GQA)", f"shape {tuple(k.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != tuple(q.shape[:3]):
        raise fail("v", f"shape [B, T, H, V] with [B, T, H] = {tuple(q.shape[:3])}", f"shape {tuple(v.shape)}")
    B, T, H, K = q.shape
    V = v.shape[3]
    if min(B, T, H, K, V) == 0:
        raise fail("q", "non-empty dims", f"q {tuple(q.shape)}, v {tuple(v.shape)}")
    return B, T, H, K, V


def check_gate(name: str, g: object, shape: Sequence[int], ref: torch.Tensor, layout: str) -> torch.Tensor:
    """A log-space decay: floating, the given shape, on ref's device, finite and <= 0."""
    g = _check_float(name, g, layout)
    if tuple(g.shape) != tuple(shape):
        raise fail(name, f"shape {layout} = {tuple(shape)}", f"shape {tuple(g.shape)}")
    if g.device != ref.device:
        raise fail(name, f"device {ref.device} (same as q)", g.device)
    # one device sync on the good path (a check per condition would cost one each on a GPU)
    if g.numel() and bool((~(torch.isfinite(g) & (g <= 0))).any()):
        if not bool(torch.isfinite(g).all()):
            raise fail(name, "finite log-space decay values", "inf or nan entries")
        raise fail(name, "log-space decay <= 0 (e.g. F.logsigmoid(x)); exp(g) is the per-step decay",
                   f"max {g.max().item():.4g}")
    return g


def check_beta(beta: object, shape: Sequence[int], ref: torch.Tensor) -> torch.Tensor:
    """Delta-rule step sizes: [B, T, H] in [0, 1]."""
    beta = _check_float("beta", beta, "[B, T, H]")
    if tuple(beta.shape) != tuple(shape):
        raise fail("beta", f"shape [B, T, H] = {tuple(shape)}", f"shape {tuple(beta.shape)}")
    if beta.device != ref.device:
        raise fail("beta", f"device {ref.device} (same as q)", beta.device)
    if beta.numel() and not bool(((beta >= 0) & (beta <= 1)).all()):
        lo, hi = beta.min().item(), beta.max().item()
        raise fail("beta", "values in [0, 1] (e.g. torch.sigmoid(x))", f"range [{lo:.4g}, {hi:.4g}]")
    return beta


def check_state(name: str, s: object, shape: Sequence[int], ref: torch.Tensor) -> torch.Tensor:
    """A recurrent state [N, H, K, V] in float32 (or float64), on ref's device."""
    s = _check_float(name, s, "[N, H, K, V]")
    if tuple(s.shape) != tuple(shape):
        raise fail(name, f"shape [N, H, K, V] = {tuple(shape)}", f"shape {tuple(s.shape)}")
    if s.dtype not in (torch.float32, torch.float64):
        raise fail(name, "dtype float32 (or float64); states are kept in full precision", s.dtype)
    if s.device != ref.device:
        raise fail(name, f"device {ref.device} (same as q)", s.device)
    return s


def resolve_scale(scale: object, K: int) -> float:
    scale = plain_scalar(scale)
    if scale is None:
        return K ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < scale < math.inf):
        raise fail("scale", "a finite float > 0 (or None for K ** -0.5)", repr(scale))
    return float(scale)


def check_chunk_size(chunk_size: object) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise fail("chunk_size", "an int >= 1", chunk_size)
    return chunk_size


def check_flag(name: str, x: object) -> bool:
    if not isinstance(x, bool):
        raise fail(name, "a bool", type(x).__name__)
    return x


def check_varlen(cu_seqlens: Optional[torch.Tensor], q: torch.Tensor) -> Optional[torch.Tensor]:
    """Offsets int32 [N+1] from 0 to T, nondecreasing, with B == 1 (docs/design.md "The contract")."""
    if cu_seqlens is None:
        return None
    return check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0], q.device)


def num_states(B: int, cu_seqlens: Optional[torch.Tensor]) -> int:
    return B if cu_seqlens is None else cu_seqlens.numel() - 1


# --- varlen -----------------------------------------------------------------------------------


def _pack_index(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Token index [N, Tmax] (clamped) and validity mask [N, Tmax] for a packed sequence."""
    cu = cu_seqlens.to(torch.int64)
    lens = (cu[1:] - cu[:-1]).tolist()
    tmax = max(max(lens), 1)
    pos = torch.arange(tmax, device=cu.device)
    valid = pos[None, :] < (cu[1:] - cu[:-1])[:, None]
    idx = (cu[:-1, None] + pos[None, :]).clamp(max=max(int(cu[-1]) - 1, 0))
    return idx, valid, lens


def unpack_varlen(x: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[1, T, ...] packed -> [N, Tmax, ...] with zeros past each sequence's end."""
    y = x[0][idx]  # [N, Tmax, ...]
    mask = valid.reshape(*valid.shape, *([1] * (y.dim() - 2)))
    return torch.where(mask, y, torch.zeros((), dtype=y.dtype, device=y.device))


def run_varlen(
    fn: Callable[..., tuple[torch.Tensor, Optional[torch.Tensor]]],
    cu_seqlens: torch.Tensor,
    tokens: Sequence[Optional[torch.Tensor]],
    initial_state: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a batched op `fn(*tokens, initial_state)` on packed sequences.

    Each `[1, T, ...]` tensor is unpacked to `[N, Tmax, ...]`, zero-padded past each end; a
    zero-padded step has k = v = 0, g = 0 and beta = 0, so it changes no state: the batched
    final state is each sequence's own final state. Outputs are packed back to `[1, T, ...]`.
    """
    idx, valid, _ = _pack_index(cu_seqlens)
    padded = [None if t is None else unpack_varlen(t, idx, valid) for t in tokens]
    o, state = fn(*padded, initial_state)
    return o[valid].unsqueeze(0), state


def run_per_sequence(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    cu_seqlens: torch.Tensor,
    tokens: Sequence[Optional[torch.Tensor]],
    initial_state: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference varlen: one call of `fn` per sequence (states reset at each boundary)."""
    cu = cu_seqlens.to("cpu", torch.int64).tolist()
    outs, states = [], []
    for n in range(len(cu) - 1):
        s, e = cu[n], cu[n + 1]
        h0 = None if initial_state is None else initial_state[n : n + 1]
        part = [None if t is None else t[:, s:e] for t in tokens]
        o, st = fn(*part, h0)
        outs.append(o)
        states.append(st)
    return torch.cat(outs, dim=1), torch.cat(states, dim=0)
