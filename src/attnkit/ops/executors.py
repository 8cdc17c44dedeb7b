"""Registry backends for methods that are "a selection (or a mask) + a shared executor".

A mechanism is a selection policy handed to shared executors (docs/design.md, "A sparse method is
a selection plus an executor"). These helpers turn a policy into the backends a `MethodSpec` lists,
so every selection-based method gains a GPU path the day an executor learns a new trick, without
touching the method:

- `selection_backends(select)`: `triton` (attnkit's sparse kernels, CUDA, every selection shape),
  then optionally `flex` (block-level selections whose blocks are multiples of 128), then
  `reference`. Triton comes first because it serves every selection shape and, with the
  selection's cost included, measured faster than flex end to end; flex can still win on a fixed
  selection. The measurements behind this order are the tables of docs/executors.md, and where a
  measured dispatch table covers the call, `backend="auto"` follows it instead.
- `mask_backends(make_mask)`: `flex` (CUDA; the predicate compiled into a block mask), then
  `reference`.

The `supports` checks use only the call and the options, never the selection, so `explain()` and
dispatch stay cheap; the selection is computed once, by the backend that runs.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..core.contract import AttentionCall
from ..core.masks import Mask
from ..core.selection import KVSelection
from ._backends import run_empty, run_reference, run_sdpa, sdpa_why_not
from ._flex import (FLEX_BLOCK, cached_block_mask, compiled_flex, flex_attention_lse, flex_why_not_mask,
                    prefix_block_mask, run_flex_block_mask, run_flex_mask, run_flex_selection, selection_block_mask)
from ._triton import run_triton, triton_why_not

# the runners a method with its own backends composes (NSA's branches, dense attention), and the
# FlexAttention pieces a benchmark needs to time the executor on a block mask built once, outside
# the timed region (`selection_block_mask`, `compiled_flex`, `run_flex_block_mask`)
__all__ = ["FLEX_BLOCK", "cached_block_mask", "compiled_flex", "flex_attention_lse", "flex_why_not_mask",
           "mask_backends", "prefix_block_mask", "run_empty", "run_flex_block_mask", "run_flex_mask",
           "run_flex_selection", "run_reference", "run_sdpa", "run_triton", "sdpa_why_not", "selection_backends",
           "selection_block_mask", "triton_why_not"]
from .dispatch import Backend

SelectFn = Callable[[AttentionCall, Any], KVSelection]
_HALF_AND_SINGLE = (torch.float16, torch.bfloat16, torch.float32)


def _triton_supports(call: AttentionCall, opts: Any) -> Optional[str]:
    return triton_why_not(call, None)  # type: ignore[arg-type]  (the selection is not needed to decide)


def selection_backends(select: SelectFn, flex_block: Optional[Callable[[Any], Optional[int]]] = None) -> tuple[Backend, ...]:
    """Backends for a method whose visibility is `select(call, opts)`.

    `flex_block(opts)` returns the method's (square) block size when its selection is block-level,
    else None; the flex backend serves it when that size is a multiple of FlexAttention's 128."""

    def reference(call: AttentionCall, opts: Any) -> Any:
        return run_reference(call, selection=select(call, opts))

    def triton(call: AttentionCall, opts: Any) -> Any:
        return run_triton(call, select(call, opts))

    backends = [Backend("triton", triton, devices=("cuda",), dtypes=_HALF_AND_SINGLE, requires=("triton",),
                        supports=_triton_supports)]
    if flex_block is not None:

        def square_blocks(opts: Any) -> Optional[tuple[int, ...]]:
            bs = flex_block(opts)  # type: ignore[misc]
            return None if bs is None else (bs,)

        def flex(call: AttentionCall, opts: Any) -> Any:
            return run_flex_selection(call, select(call, opts), None)

        backends.append(Backend("flex", flex, devices=("cuda",), dtypes=_HALF_AND_SINGLE, varlen=False,
                                requires=("flex",), block_multiple=FLEX_BLOCK, blocks=square_blocks,
                                supports=lambda call, opts: flex_why_not_mask(call, None)))  # type: ignore[arg-type]
    backends.append(Backend("reference", reference))
    return tuple(backends)


def mask_backends(make_mask: Callable[[Any], Mask]) -> tuple[Backend, ...]:
    """Backends for a method whose visibility is the predicate `make_mask(opts)`."""

    def reference(call: AttentionCall, opts: Any) -> Any:
        return run_reference(call, mask=make_mask(opts))

    def flex(call: AttentionCall, opts: Any) -> Any:
        return run_flex_mask(call, make_mask(opts))

    return (
        Backend("flex", flex, devices=("cuda",), dtypes=_HALF_AND_SINGLE, varlen=False, requires=("flex",),
                supports=lambda call, opts: flex_why_not_mask(call, None)),  # type: ignore[arg-type]
        Backend("reference", reference),
    )
