"""Static attention patterns as composable mask predicates.

See docs/design.md "A sparse method is a selection plus an executor".

A predicate is a function `fn(b, h, q_pos, k_pos) -> bool tensor`, written with broadcasting tensor
ops only, in the spirit of FlexAttention's `mask_mod`: `b` is the batch index (the sequence index
under varlen), `h` the *query* head, `q_pos` the query position in key coordinates (bottom-right
aligned: query i of Tq sits at i + Tk - Tq) and `k_pos` the key position, both local to their
sequence. Predicates compose with `&`, `|` and `~`, and convert to a dense boolean mask (tests),
to a block-level `KVSelection`, or run inside the blockwise reference tile by tile.

Window-style predicates use the distance `|q_pos - k_pos|`; combined with causality (which the
executors apply from `causal=True`) that is `0 <= i - j < window`.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

from .checks import check_int
from .contract import OptionError

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Mask:
    """A named, composable mask predicate."""

    def __init__(self, fn: MaskFn, name: str, head_dependent: bool = False) -> None:
        self.fn = fn
        self.name = name
        self.head_dependent = head_dependent

    def __call__(self, b: torch.Tensor, h: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return self.fn(b, h, q_pos, k_pos)

    def __and__(self, other: "Mask") -> "Mask":
        return Mask(lambda b, h, q, k: self(b, h, q, k) & other(b, h, q, k), f"({self.name} & {other.name})",
                    self.head_dependent or other.head_dependent)

    def __or__(self, other: "Mask") -> "Mask":
        return Mask(lambda b, h, q, k: self(b, h, q, k) | other(b, h, q, k), f"({self.name} | {other.name})",
                    self.head_dependent or other.head_dependent)

    def __invert__(self) -> "Mask":
        return Mask(lambda b, h, q, k: ~self(b, h, q, k), f"~{self.name}", self.head_dependent)

    def __repr__(self) -> str:
        return f"Mask({self.name})"


def full() -> Mask:
    """Every key visible."""
    return Mask(lambda b, h, q, k: torch.ones_like(q - k, dtype=torch.bool), "full")


def causal() -> Mask:
    """Key j visible to query i iff j <= i (positions already bottom-right aligned)."""
    return Mask(lambda b, h, q, k: k <= q, "causal")


def sinks(n: int) -> Mask:
    """The first `n` keys (StreamingLLM's attention sinks)."""
    check_int("sinks", n, 0)
    return Mask(lambda b, h, q, k: k < n, f"sinks({n})")


def _per_head(name: str, value: Union[int, Sequence[int]], minimum: int) -> Union[int, torch.Tensor]:
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise OptionError(f"{name}: expected a non-empty per-head list, got []")
        for x in value:
            check_int(name, x, minimum)
        return torch.tensor(list(value), dtype=torch.int64)
    if isinstance(value, torch.Tensor):
        raise OptionError(f"{name}: expected an int or a list of ints, got a Tensor")
    return check_int(name, value, minimum)


def _head_value(value: Union[int, torch.Tensor], h: torch.Tensor) -> Union[int, torch.Tensor]:
    if isinstance(value, int):
        return value
    return value.to(h.device)[h]


def sliding_window(window: Union[int, Sequence[int]]) -> Mask:
    """Keys within distance `window` (`i - j < window` under causality). A list sets one window
    per query head (MSWA: multi-scale windows)."""
    w = _per_head("window", window, 1)
    return Mask(lambda b, h, q, k: (q - k).abs() < _head_value(w, h), f"window({window})",
                head_dependent=not isinstance(w, int))


def dilated(dilation: int, window: int = 0) -> Mask:
    """Keys at distances that are multiples of `dilation`, plus a dense local part of `window`."""
    check_int("dilation", dilation, 1)
    check_int("window", window, 0)
    return Mask(lambda b, h, q, k: (torch.remainder(q - k, dilation) == 0) | ((q - k).abs() < window),
                f"dilated({dilation}, window={window})")


def strided(num_shards: int, window: int = 0) -> Mask:
    """S2-Attention: head h sees keys with j % num_shards == h % num_shards, plus a local window;
    the heads together cover the whole context."""
    check_int("num_shards", num_shards, 1)
    check_int("window", window, 0)
    return Mask(lambda b, h, q, k: (torch.remainder(k, num_shards) == torch.remainder(h, num_shards)) | ((q - k).abs() < window),
                f"strided({num_shards}, window={window})", head_dependent=True)


def dense_mask(mask: Mask | None, batch: int, heads: int, tq: int, tk: int, is_causal: bool,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Materialise `[batch, heads, tq, tk]` booleans. For tests and pictures only: O(T^2)."""
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q = (torch.arange(tq, device=device) + (tk - tq)).view(1, 1, -1, 1)
    k = torch.arange(tk, device=device).view(1, 1, 1, -1)
    out = torch.ones(batch, heads, tq, tk, dtype=torch.bool, device=device)
    if mask is not None:
        out &= mask(b, h, q, k)
    if is_causal:
        out &= k <= q
    return out
