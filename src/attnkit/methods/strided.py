"""`strided`: heterogeneous context sharding across heads (S2-Attention).

Query head h sees keys with `j % num_shards == h % num_shards`, plus a local `window`; together
the heads cover the whole context, each at 1/num_shards of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core import masks
from ..core.checks import check_int
from ..core.contract import AttentionCall, OptionError
from ..registry import MethodOptions, register_selection


@dataclass(frozen=True)
class StridedOptions(MethodOptions):
    num_shards: int
    window: int = 0

    def __post_init__(self) -> None:
        check_int("num_shards", self.num_shards, 1)
        check_int("window", self.window, 0)

    def check_call(self, call: AttentionCall) -> None:
        if self.num_shards > call.hq:
            raise OptionError(
                f"num_shards: expected <= Hq={call.hq} so the heads together cover every key, got {self.num_shards}"
            )


def mask(opts: StridedOptions) -> masks.Mask:
    return masks.strided(opts.num_shards, opts.window)


SPEC = register_selection(
    "strided",
    StridedOptions,
    mask=mask,
    paper="S2-Attention (heterogeneous context sharding)",
    summary="head h sees keys j with j % num_shards == h % num_shards, plus a local `window`",
    example=lambda call: {"num_shards": min(4, call.hq), "window": 16},
)
