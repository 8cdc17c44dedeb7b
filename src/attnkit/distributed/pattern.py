"""Which (query, key) pairs are visible, in global positions, and what that means for a block.

The ring sees one rectangle of the attention matrix at a time: the queries of a local segment
against the keys of a (possibly remote) segment. `Visibility` is the rule of the `sliding_window`
method (StreamingLLM, MECHANISMS.md) in global coordinates:

    visible(i, j) = (not causal or j <= i) and (window is None or |i - j| < window or j < sinks)

and `classify` tells, from the two position ranges alone, whether a rectangle is empty (skip it,
and skip sending its keys), fully visible (no mask: the fastest kernel), causal on its diagonal,
or partial (a mask predicate evaluated tile by tile, never as a `Tq x Tk` tensor).

With `exclude_sinks`, keys `j < sinks` are left out (the ring serves them in a separate pass
from a broadcast of the sink tokens, so they are not counted twice).
"""

from __future__ import annotations

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

        def fn(b: torch.Tensor, h: torch.Tensor, qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
            i, j = qp + q_shift, kp + k_shift
            m = (j <= i) if causal else torch.ones_like(i - j, dtype=torch.bool)
            if window is not None:
                w = (i - j).abs() < window
                if sinks:
                    w = (w & (j >= sinks)) if exclude else (w | (j < sinks))
                m = m & w
            return m

        return Mask(fn, f"global({self}, q+{q_shift}, k+{k_shift})")
