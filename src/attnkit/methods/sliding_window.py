"""`sliding_window`: local attention plus attention sinks (StreamingLLM; MSWA per-head windows).

Key j is visible to query i iff `i - j < window` or `j < sinks` (and causality). `window` may be
a list with one entry per query head (MSWA: multi-scale windows across heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ..core import masks
from ..core.checks import check_int
from ..core.contract import AttentionCall, OptionError
from ..registry import MethodOptions, register_selection


@dataclass(frozen=True)
class SlidingWindowOptions(MethodOptions):
    window: Union[int, tuple[int, ...]]
    sinks: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.window, (list, tuple)):
            if len(self.window) == 0:
                raise OptionError("window: expected an int >= 1 or a non-empty per-head list, got []")
            for w in self.window:
                check_int("window", w, 1)
            object.__setattr__(self, "window", tuple(self.window))
        else:
            check_int("window", self.window, 1)
        check_int("sinks", self.sinks, 0)

    def check_call(self, call: AttentionCall) -> None:
        if isinstance(self.window, tuple) and len(self.window) != call.hq:
            raise OptionError(f"window: expected one window per query head ({call.hq}), got {len(self.window)}")


def mask(opts: SlidingWindowOptions) -> masks.Mask:
    m = masks.sliding_window(list(opts.window) if isinstance(opts.window, tuple) else opts.window)
    return m | masks.sinks(opts.sinks) if opts.sinks else m


SPEC = register_selection(
    "sliding_window",
    SlidingWindowOptions,
    mask=mask,
    paper="StreamingLLM (sinks); MSWA (per-head windows)",
    summary="local window of `window` keys plus `sinks` first keys; per-head windows allowed",
    example=lambda call: {"window": max(1, call.tk // 8), "sinks": 4},
)
