"""`stochastic`: Stochastic Attention (Jin & Sui 2026, connectome-inspired randomized routing).

A seeded random permutation `P` of the token positions (one per layer: pass a different `seed`
per layer); sliding-window attention of `window` in the permuted order; outputs un-permuted.
Key j is visible to query i iff `|rank(i) - rank(j)| < window` (rank = position in permuted
order) and, with causality, `j <= i` in the *original* order. Depth composes independent
permutations into a receptive field that grows exponentially, at SWA's O(T * window) cost.

Written as a selection, permute / window / un-permute is exact and needs no data movement: row i
lists the keys `P[rank(i) + d]` for `|d| < window` (token-level keys, shared by all heads), and the
executor applies the original-order causal rule.

The permutation comes from a counter-based hash of `(seed, position)`: ranks are the sorted order
of per-position hash keys, so it is the same on every device, needs no generator state, and is
prefix-consistent (a sequence of length L is ordered like the first L tokens of a longer one), which
makes varlen equal to per-sequence runs and decode consistent with prefill.

Selection: `KVSelection(indices [B, 1, Tq, min(2 * window - 1, Tk)], q_block=1, k_block=1)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.checks import check_int
from ..core.contract import AttentionCall, OptionError
from ..core.selection import KVSelection
from ..registry import MethodOptions, register_selection
from .router import compact_rows, seq_view

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors holding values in [0, 2^32) (products stay < 2^63)."""
    x = x ^ (x >> 16)
    x = (x * 0x2C1B3C6D) & _MASK32
    x = x ^ (x >> 12)
    x = (x * 0x297A2D39) & _MASK32
    return x ^ (x >> 15)


def hash_keys(seed: int, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-position sort keys `[length]` int64 for the permutation of layer `seed`."""
    pos = torch.arange(length, device=device, dtype=torch.int64)
    s = _mix32(torch.tensor(seed & _MASK32, dtype=torch.int64, device=device))
    return _mix32((pos + s) & _MASK32)


def permutation(seed: int, lengths: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(perm, rank)`, each `[N, max_len]` int64: `perm[n, r]` is the token at permuted position r
    of sequence n (length `lengths[n]`), `rank` its inverse; padding positions sort last."""
    dev = lengths.device
    keys = hash_keys(seed, max_len, dev).unsqueeze(0).expand(lengths.numel(), -1)
    pos = torch.arange(max_len, device=dev)
    keys = torch.where(pos.unsqueeze(0) < lengths.view(-1, 1), keys, torch.full_like(keys, 1 << 40))
    perm = keys.sort(dim=-1, stable=True).indices
    rank = torch.empty_like(perm).scatter_(-1, perm, pos.expand_as(perm).contiguous())
    return perm, rank


@dataclass(frozen=True)
class StochasticOptions(MethodOptions):
    window: int
    seed: int = 0  # the layer's permutation

    def __post_init__(self) -> None:
        check_int("window", self.window, 1)
        check_int("seed", self.seed, 0)
        if self.seed > _MASK32:  # the hash is 32-bit: a larger seed would repeat a smaller one's permutation
            raise OptionError(f"seed: expected an int in [0, 2**32), got {self.seed!r}")


def policy(call: AttentionCall, opts: StochasticOptions) -> KVSelection:
    """The Stochastic Attention selection of a validated call."""
    view = seq_view(call)
    dev = view.q.device
    perm, rank = permutation(opts.seed, view.k_len, view.tk)  # [N, Tk]
    q_rank = rank[:, view.q_pos().clamp(0, view.tk - 1)]  # [N, Tq]
    d = torch.arange(-(opts.window - 1), opts.window, device=dev)
    r = q_rank.unsqueeze(-1) + d  # [N, Tq, 2w-1] permuted positions in the window
    ok = (r >= 0) & (r < view.k_len.view(-1, 1, 1))
    keys = perm.gather(1, r.clamp(0, view.tk - 1).flatten(1)).view_as(r)
    idx = torch.where(ok, keys, torch.full_like(keys, -1)).unsqueeze(1)  # [N, 1, Tq, 2w-1]
    if view.offset < 0:  # Tq > Tk: queries before the first key see nothing
        idx = idx.masked_fill((view.q_pos() < 0).view(1, 1, -1, 1), -1)
    return KVSelection(compact_rows(idx, view.tk), q_block=1, k_block=1)


def select(q: torch.Tensor, k: torch.Tensor, *, window: int, seed: int = 0, causal: bool = True,
           cu_seqlens: Optional[torch.Tensor] = None) -> KVSelection:
    """Stochastic Attention's selection for the shapes of `q: [B, Tq, Hq, D]`, `k: [B, Tk, Hkv, D]`:
    row i lists the keys within `window` of i in the seeded permuted order (causality is the executor's).

    Returns `KVSelection(indices int32 [B (N under varlen), 1, Tq, min(2 * window - 1, Tk)], 1, 1)`."""
    return SPEC.selection(q, k, causal=causal, cu_seqlens=cu_seqlens, window=window, seed=seed)


def _example(call: AttentionCall) -> dict[str, Any]:
    return {"window": max(1, min(256, call.tk // 8)), "seed": 0}


SPEC = register_selection("stochastic", StochasticOptions, policy, family="static", example=_example, tier=2,
                          paper="Stochastic Attention: Connectome-Inspired Randomized Routing",
                          summary="sliding window in a seeded random permutation of the tokens, causal in the "
                                  "original order")
