"""Which (query, key) pairs are visible, in global positions, and what that means for a block.

The ring sees one rectangle of the attention matrix at a time: the queries of a local segment
against the keys of a (possibly remote) segment. `Visibility` is the rule of the `sliding_window`
method (StreamingLLM, docs/mechanisms.md) in global coordinates:

    visible(i, j) = (not causal or j <= i) and (window is None or |i - j| < window or j < sinks)

and `classify` tells, from the two position ranges alone, whether a rectangle is empty (skip it,
and skip sending its keys), fully visible (no mask: the fastest kernel), causal on its diagonal,
or partial (a mask predicate evaluated tile by tile, never as a `Tq x Tk` tensor).

With `exclude_sinks`, keys `j < sinks` are left out (the ring serves them in a separate pass
from a broadcast of the sink tokens, so they are not counted twice).

With `docs` (the global `cu_seqlens` of packed sequences) a pair is visible only inside one
sequence, and the rule above applies to positions counted from that sequence's start (so sinks
are each sequence's first tokens). A rectangle inside one sequence is classified as above; one
that straddles sequences is empty or partial.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional

import torch

from ..core.masks import Mask

NONE, FULL, CAUSAL, PARTIAL = "none", "full", "causal", "partial"


@dataclass(frozen=True)
class Visibility:
    causal: bool
    window: Optional[int] = None
    sinks: int = 0
    exclude_sinks: bool = False
    docs: Optional[tuple[int, ...]] = None  # global cu_seqlens of packed sequences

    def __post_init__(self) -> None:
        if self.window is None:  # without a window every key is visible anyway: sinks mean nothing
            object.__setattr__(self, "sinks", 0)
            object.__setattr__(self, "exclude_sinks", False)

    # --- rectangle classification -------------------------------------------------------------

    def _any(self, qa: int, qb: int, a: int, b: int, windowed: bool) -> bool:
        if a >= b:
            return False
        if self.causal and a > qb - 1:
            return False
        if not windowed:
            return True
        if self.causal:
            dmin = max(0, qa - (b - 1))
        else:
            dmin = max(0, qa - (b - 1), a - (qb - 1))
        return dmin < self.window  # type: ignore[operator]

    def _all(self, qa: int, qb: int, a: int, b: int, windowed: bool) -> bool:
        if a >= b:
            return True
        if self.causal and b - 1 > qa:
            return False
        if not windowed:
            return True
        dmax = (qb - 1 - a) if self.causal else max(qb - 1 - a, b - 1 - qa)
        return dmax < self.window  # type: ignore[operator]

    def classify(self, qa: int, qb: int, ka: int, kb: int) -> str:
        """Queries at global positions `[qa, qb)` against keys `[ka, kb)`: NONE, FULL, CAUSAL or PARTIAL."""
        if self.docs is None:
            return self._classify(qa, qb, ka, kb)
        docs = self.docs
        kinds = []  # per sequence meeting both ranges, in sequence-local positions
        for d in range(max(bisect.bisect_right(docs, max(qa, ka)) - 1, 0), len(docs) - 1):
            s, e = docs[d], docs[d + 1]
            if s >= min(qb, kb):
                break
            if max(qa, s) < min(qb, e) and max(ka, s) < min(kb, e):
                kinds.append(self._classify(max(qa, s) - s, min(qb, e) - s, max(ka, s) - s, min(kb, e) - s))
        if all(k == NONE for k in kinds):
            return NONE
        d = bisect.bisect_right(docs, qa) - 1
        one_doc = 0 <= d < len(docs) - 1 and docs[d] <= min(qa, ka) and max(qb, kb) <= docs[d + 1]
        return kinds[0] if one_doc and len(kinds) == 1 else PARTIAL

    def _classify(self, qa: int, qb: int, ka: int, kb: int) -> str:
        windowed = self.window is not None
        s = self.sinks
        sink_part = (ka, min(kb, s))  # keys that are sinks: visible by causality alone (unless excluded)
        rest = (max(ka, s), kb)  # other keys: causality and the window
        any_vis = (not self.exclude_sinks and self._any(qa, qb, *sink_part, windowed=False)) or self._any(
            qa, qb, *rest, windowed=windowed)
        if not any_vis:
            return NONE
        sinks_all = sink_part[0] >= sink_part[1] or (not self.exclude_sinks and self._all(qa, qb, *sink_part, windowed=False))
        if sinks_all and self._all(qa, qb, *rest, windowed=windowed):
            return FULL
        diagonal = qa == ka and qb == kb
        window_covers = not windowed or (qb - 1 - ka) < self.window  # type: ignore[operator]
        sinks_ok = sink_part[0] >= sink_part[1] or not self.exclude_sinks
        if self.causal and diagonal and window_covers and sinks_ok:
            return CAUSAL
        return PARTIAL

    # --- the predicate for partial rectangles -------------------------------------------------

    def mask(self, q_shift: int, k_shift: int) -> Mask:
        """This rule as a `core.masks` predicate for a call whose (bottom-right aligned) local query
        position `p` is global position `p + q_shift` and local key `p` is global `p + k_shift`."""
        causal, window, sinks, exclude = self.causal, self.window, self.sinks, self.exclude_sinks
        bounds = None if self.docs is None else torch.tensor(self.docs, dtype=torch.int64)

        def fn(b: torch.Tensor, h: torch.Tensor, qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
            i, j = qp + q_shift, kp + k_shift
            same = None
            if bounds is not None:  # sequence-local positions; pairs across sequences are hidden
                bd = bounds.to(i.device)
                di = torch.searchsorted(bd, i.contiguous(), right=True) - 1
                dj = torch.searchsorted(bd, j.contiguous(), right=True) - 1
                start = bd[di]
                i, j, same = i - start, j - start, di == dj
            m = (j <= i) if causal else torch.ones_like(i - j, dtype=torch.bool)
            if window is not None:
                w = (i - j).abs() < window
                if sinks:
                    w = (w & (j >= sinks)) if exclude else (w | (j < sinks))
                m = m & w
            return m if same is None else m & same

        return Mask(fn, f"global({self}, q+{q_shift}, k+{k_shift})")
