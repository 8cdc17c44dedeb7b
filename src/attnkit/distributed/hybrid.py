"""Ulysses x ring over a 2-D process group (as in USP / LoongTrain's 2-D sequence parallelism).

`W = R * U` ranks form R ring groups of U ranks each... more precisely: rank `g = r * U + u` is
member `u` of Ulysses group `r` and member `r` of ring group `u`. Ulysses groups (U consecutive
ranks: put them inside a node, all-to-all wants bandwidth) trade sequence for heads; ring groups
then pass key/value shards across nodes. Heads only need to divide by U, so a GQA model with
few KV heads still scales to many ranks.

Sharding: the global sequence is first split over the R ring positions by the ring `layout`,
then each ring shard is cut into U contiguous pieces (`hybrid_shard`). After the Ulysses
all-to-all a rank holds ring shard r whole, with `H / U` heads, exactly what the ring expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..core.contract import AttnkitError
from .comm import Comm, CommStats
from .layout import shard, unshard
from .ring import ring_attention
from .ulysses import _HeadsToSeq, _SeqToHeads, _kv_plan


@dataclass(frozen=True)
class HybridGroups:
    """The two groups this rank belongs to, and its coordinates `(ring_rank, ulysses_rank)`."""

    ulysses: dist.ProcessGroup
    ring: dist.ProcessGroup
    ulysses_size: int
    ring_size: int
    ulysses_rank: int
    ring_rank: int
    group: Optional[dist.ProcessGroup] = None  # the whole 2-D group (None: the world)


def hybrid_groups(ulysses_size: int, group: Optional[dist.ProcessGroup] = None) -> HybridGroups:
    """Split `group` (default: the world) into Ulysses groups of `ulysses_size` consecutive ranks
    and ring groups across them. Collective: every rank of `group` must call it."""
    comm = Comm(group, "hybrid_groups")
    W = comm.world
    if isinstance(ulysses_size, bool) or not isinstance(ulysses_size, int) or ulysses_size < 1 or W % ulysses_size:
        raise AttnkitError(f"ulysses_size: expected a positive divisor of the group size {W}, got {ulysses_size!r}")
    U, R = ulysses_size, W // ulysses_size
    members = [comm.global_rank(i) for i in range(W)]
    mine_u = mine_r = None
    for r in range(R):  # every rank creates every group, in the same order (new_group is collective)
        g = dist.new_group([members[r * U + u] for u in range(U)])
        if comm.rank // U == r:
            mine_u = g
    for u in range(U):
        g = dist.new_group([members[r * U + u] for r in range(R)])
        if comm.rank % U == u:
            mine_r = g
    return HybridGroups(mine_u, mine_r, U, R, comm.rank % U, comm.rank // U, group)


def hybrid_shard(x: torch.Tensor, ring_size: int, ulysses_size: int, rank: int, layout: str = "zigzag",
                 dim: int = 1) -> torch.Tensor:
    """Rank `rank`'s piece of the global sequence `x` for `hybrid_attention` (rank = r * U + u)."""
    if not 0 <= rank < ring_size * ulysses_size:
        raise AttnkitError(f"rank: expected 0 <= rank < {ring_size * ulysses_size}, got {rank}")
    ring_part = shard(x, ring_size, rank // ulysses_size, layout, dim)
    return shard(ring_part, ulysses_size, rank % ulysses_size, "contiguous", dim)


def hybrid_unshard(shards: Sequence[torch.Tensor], ring_size: int, ulysses_size: int, layout: str = "zigzag",
                   dim: int = 1) -> torch.Tensor:
    """Inverse of `hybrid_shard`: the global sequence from all ranks' pieces, in rank order."""
    if len(shards) != ring_size * ulysses_size:
        raise AttnkitError(f"shards: expected {ring_size * ulysses_size} pieces, got {len(shards)}")
    U = ulysses_size
    ring_parts = [torch.cat(list(shards[r * U:(r + 1) * U]), dim) for r in range(ring_size)]
    return unshard(ring_parts, layout, dim)


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: HybridGroups,
    causal: bool = True,
    layout: str = "zigzag",
    window: Union[None, int, Sequence[int]] = None,
    sinks: int = 0,
    scale: Optional[float] = None,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    stats: Optional[CommStats] = None,
) -> torch.Tensor:
    """Exact attention of a sequence sharded by `hybrid_shard` over `groups` (`hybrid_groups`).

    `q: [B, T, Hq, D]`, `k`/`v: [B, T, Hkv, D|Dv]`: this rank's piece; returns its rows of the
    output. `Hq` must divide by the Ulysses size; KV heads are split or repeated as in
    `ulysses_attention`. `causal`, `layout`, `window`, `sinks`, `scale`, `cu_seqlens` (global
    offsets of packed sequences), `backend` are the ring's;
    a per-head `window` list (one int per query head) is cut to the heads each rank holds.
    """
    if not isinstance(groups, HybridGroups):
        raise AttnkitError(f"groups: expected HybridGroups from attnkit.distributed.hybrid_groups, got {type(groups).__name__}")
    ucomm = Comm(groups.ulysses, "hybrid_attention (Ulysses group)")
    # agree over the whole 2-D group first, so a bad piece anywhere fails every rank at once
    Comm(groups.group, "hybrid_attention").agree(
        _problem(q, k, v, ucomm.world), _signature(q, k, v), lambda s: f"q [B, T, Hq, D] = {s[:4]}, k/v {s[4:]}")
    repeat = _kv_plan(q.shape[2], k.shape[2], ucomm.world)
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    qh, kh, vh = (_SeqToHeads.apply(x, ucomm, stats) for x in (q, k, v))
    if isinstance(window, (list, tuple)) and len(window) == q.shape[2]:  # this rank's heads after the all-to-all
        h = qh.shape[2]
        window = list(window[ucomm.rank * h:(ucomm.rank + 1) * h])
    o = ring_attention(qh, kh, vh, groups.ring, causal=causal, layout=layout, window=window, sinks=sinks,
                       scale=scale, cu_seqlens=cu_seqlens, backend=backend, stats=stats)
    return _HeadsToSeq.apply(o, ucomm, stats)


def _signature(q: object, k: object, v: object) -> list[int]:
    ok = all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (q, k, v))
    return [int(d) for x in (q, k, v) for d in x.shape] if ok else [-1] * 12


def _problem(q: object, k: object, v: object, ulysses_size: int) -> Optional[str]:
    try:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise AttnkitError(f"{name}: expected a 4-D tensor [B, T, H, D], got "
                                   f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        _kv_plan(q.shape[2], k.shape[2], ulysses_size)
    except AttnkitError as e:
        return str(e)
    return None
