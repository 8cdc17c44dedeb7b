"""How a global sequence is split over the ranks of a context-parallel group.

Two layouts, as in Ring Attention and its zigzag variant (ring-flash-attention, Llama 3's CP):

- `contiguous`: rank r holds tokens `[r * C, (r + 1) * C)` of the `T = W * C` tokens.
- `zigzag`: the sequence is cut into `2W` chunks of `c = T / 2W`; rank r holds chunk `r` followed
  by chunk `2W - 1 - r`. Under a causal mask every rank then has the same amount of work (an early
  chunk sees little, its mirror sees much), where `contiguous` leaves the last rank with most.

A rank's shard is a list of `Segment`s: runs of consecutive global positions stored one after
the other in the local tensor. Local order is increasing global order in both layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.contract import AttnkitError

LAYOUTS = ("zigzag", "contiguous")


@dataclass(frozen=True)
class Segment:
    """Global positions `[start, start + length)` stored at local rows `[offset, offset + length)`."""

    start: int
    length: int
    offset: int

    @property
    def stop(self) -> int:
        return self.start + self.length


def check_layout(layout: object) -> str:
    if layout not in LAYOUTS:
        raise AttnkitError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return layout  # type: ignore[return-value]


def chunks_per_rank(layout: str) -> int:
    """Number of equal chunks a rank's shard is made of (the local length must divide by it)."""
    return 2 if check_layout(layout) == "zigzag" else 1


def segments(layout: str, world: int, rank: int, local_len: int) -> tuple[Segment, ...]:
    """The segments of `rank`'s shard, each `local_len // chunks_per_rank(layout)` long."""
    if check_layout(layout) == "contiguous":
        return (Segment(rank * local_len, local_len, 0),)
    c = local_len // 2
    return (Segment(rank * c, c, 0), Segment((2 * world - 1 - rank) * c, c, c))


def positions(layout: str, world: int, rank: int, local_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Global position of each local token of `rank`: `[local_len]` int64."""
    return torch.cat([torch.arange(s.start, s.stop, device=device) for s in segments(layout, world, rank, local_len)])


def _check_split(name: str, total: int, world: int, layout: str) -> int:
    parts = world * chunks_per_rank(layout)
    if total % parts != 0:
        raise AttnkitError(
            f"{name}: expected a sequence length divisible by {parts} ({world} ranks x "
            f"{chunks_per_rank(layout)} chunks for layout {layout!r}), got {total}"
        )
    return total // world


def shard(x: torch.Tensor, world: int, rank: int, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """`rank`'s shard of the global sequence `x` (sequence along `dim`, `[B, T, ...]` by default)."""
    if not isinstance(world, int) or world < 1 or not isinstance(rank, int) or not 0 <= rank < world:
        raise AttnkitError(f"rank: expected 0 <= rank < world (world={world!r}), got {rank!r}")
    local = _check_split("x", x.shape[dim], world, layout)
    parts = [x.narrow(dim, s.start, s.length) for s in segments(layout, world, rank, local)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def unshard(shards: Sequence[torch.Tensor], layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """Inverse of `shard`: the global sequence from every rank's shard (in rank order)."""
    world = len(shards)
    if world == 0:
        raise AttnkitError("shards: expected one tensor per rank, got an empty sequence")
    local = shards[0].shape[dim]
    for r, s in enumerate(shards):
        if s.shape != shards[0].shape:
            raise AttnkitError(f"shards: expected equal shapes {tuple(shards[0].shape)}, rank {r} has {tuple(s.shape)}")
    _check_split("shards", local * world, world, layout)
    pieces: list[tuple[int, torch.Tensor]] = []
    for r, s in enumerate(shards):
        for seg in segments(layout, world, r, local):
            pieces.append((seg.start, s.narrow(dim, seg.offset, seg.length)))
    return torch.cat([p for _, p in sorted(pieces, key=lambda item: item[0])], dim)


def gather(x: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """All ranks' shards of `x`, all-gathered and put back in global order (no autograd)."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return unshard(parts, layout, dim)
