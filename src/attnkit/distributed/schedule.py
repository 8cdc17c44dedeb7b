"""The ring's plan, computed identically on every rank from the layout and the visibility rule.

At step t, rank r holds the KV shard of rank `src = (r - t) % W`. For every (rank, step) the plan
lists the local attention calls to make (`Call`: a run of local query rows against a run of held
key segments, with its kind), and, for every shard, which of its segments still have to travel:
a segment is forwarded into step t only if some rank needs it at step t or later. A sliding window
therefore stops the ring early (contiguous layout) or thins what it carries (zigzag), and the
bytes saved are real: they are never sent. Because senders and receivers derive the same plan,
they agree on every message's shape without exchanging metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .layout import Segment, segments
from .pattern import CAUSAL, FULL, NONE, Visibility


@dataclass(frozen=True)
class Call:
    """Local query rows `[q_lo, q_hi)` against the held key segments `k_segs` (consecutive indices)."""

    q_lo: int
    q_hi: int
    k_segs: tuple[int, ...]
    kind: str  # FULL, CAUSAL or PARTIAL
    q_start: int  # global position of local row q_lo (for PARTIAL masks)


class RingSchedule:
    def __init__(self, world: int, local_len: int, layout: str, vis: Visibility) -> None:
        self.world, self.local_len, self.layout, self.vis = world, local_len, layout, vis
        self._calls: dict[tuple[int, int], list[Call]] = {}
        self.segs: list[tuple[Segment, ...]] = [segments(layout, world, r, local_len) for r in range(world)]
        # kinds[t][src][qg][kg]: rank (src + t) % W's query segment qg against src's key segment kg
        self.kinds = [[self._kinds((src + t) % world, src) for src in range(world)] for t in range(world)]
        self.last = [max([t for t in range(world) if self._used(t, src)] or [0]) for src in range(world)]
        self.steps = max(self.last) + 1

    def _kinds(self, rank: int, src: int) -> list[list[str]]:
        return [[self.vis.classify(q.start, q.stop, k.start, k.stop) for k in self.segs[src]] for q in self.segs[rank]]

    def _used(self, t: int, src: int) -> bool:
        return any(kind != NONE for row in self.kinds[t][src] for kind in row)

    def used_segments(self, t: int, src: int) -> set[int]:
        """Key segments of `src` that rank `(src + t) % W` attends to at step t."""
        return {kg for row in self.kinds[t][src] for kg, kind in enumerate(row) if kind != NONE}

    def carried(self, src: int, t: int) -> tuple[int, ...]:
        """Segments of `src`'s shard held at step t: all of them at t = 0, else those still needed."""
        if t == 0:
            return tuple(range(len(self.segs[src])))
        need: set[int] = set()
        for t2 in range(t, self.steps):
            need |= self.used_segments(t2, src)
        return tuple(sorted(need))

    def grad_segments(self, src: int) -> tuple[int, ...]:
        """Segments of `src`'s shard whose key/value gradients travel (attended at some step >= 1)."""
        need: set[int] = set()
        for t in range(1, self.last[src] + 1):
            need |= self.used_segments(t, src)
        return tuple(sorted(need))

    def seg_len(self, src: int, g: int) -> int:
        return self.segs[src][g].length

    def calls(self, rank: int, t: int) -> list[Call]:
        """The attention calls of `rank` at step t, coalesced: runs of fully visible key segments
        become one call, and query segments with identical calls merge. Memoised per (rank, t)."""
        key = (rank, t)
        if key not in self._calls:
            self._calls[key] = self._make_calls(rank, t)
        return self._calls[key]

    def _make_calls(self, rank: int, t: int) -> list[Call]:
        src = (rank - t) % self.world
        qsegs, kinds = self.segs[rank], self.kinds[t][src]
        if t == 0 and self.vis.causal and self.vis.window is None and self.vis.docs is None:
            # own shard, plain causal: local order is global order, so local causality is exact
            return [Call(0, self.local_len, tuple(range(len(qsegs))), CAUSAL, qsegs[0].start)]
        per_q: list[list[Call]] = []
        for qg, q in enumerate(qsegs):
            row: list[Call] = []
            for kg, kind in enumerate(kinds[qg]):
                if kind == NONE:
                    continue
                prev = row[-1] if row else None
                if kind == FULL and prev is not None and prev.kind == FULL and prev.k_segs[-1] == kg - 1:
                    row[-1] = Call(prev.q_lo, prev.q_hi, prev.k_segs + (kg,), FULL, prev.q_start)
                else:
                    row.append(Call(q.offset, q.offset + q.length, (kg,), kind, q.start))
            per_q.append(row)
        out: list[Call] = []
        for row in per_q:
            for c in row:
                last = out[-1] if out else None
                if (last is not None and c.kind == FULL and last.kind == FULL and last.k_segs == c.k_segs
                        and last.q_hi == c.q_lo):
                    out[-1] = Call(last.q_lo, c.q_hi, c.k_segs, FULL, last.q_start)
                else:
                    out.append(c)
        return out

    @cached_property
    def total_calls(self) -> int:
        return sum(len(self.calls(r, t)) for r in range(self.world) for t in range(self.steps))
