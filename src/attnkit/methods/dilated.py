"""`dilated`: dilated attention (RAT+ dilated inference).

Key j is visible to query i iff `(i - j) % dilation == 0`, or `i - j < window` (a dense local part,
default 0), and causality.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core import masks
from ..core.checks import check_int
from ..registry import MethodOptions, register_selection


@dataclass(frozen=True)
class DilatedOptions(MethodOptions):
    dilation: int
    window: int = 0

    def __post_init__(self) -> None:
        check_int("dilation", self.dilation, 1)
        check_int("window", self.window, 0)


def mask(opts: DilatedOptions) -> masks.Mask:
    return masks.dilated(opts.dilation, opts.window)


SPEC = register_selection(
    "dilated",
    DilatedOptions,
    mask=mask,
    paper="RAT+ (dilated inference)",
    summary="keys at distances divisible by `dilation`, plus a local `window`",
    example=lambda call: {"dilation": 4, "window": 16},
)
