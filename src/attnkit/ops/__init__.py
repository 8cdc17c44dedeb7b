"""Executors: one function per op, backends behind it (docs/design.md "Backends and dispatch").

Each op declares its backends as data and picks one through `ops.dispatch` (the one dispatcher);
`attnkit.explain(q, k, v, method="ops.<op>", ...)` shows the decision for the same arguments
(`attnkit.ops.explain("decode_attention", q, cache, ...)` for decoding, which has no k, v).
"""

from typing import Any

from . import decode, dense, masked, sparse
from .decode import decode_attention
from .dense import dense_attention
from .dispatch import Explanation
from .masked import masked_attention
from .sparse import sparse_attention

# op name -> its planner (validation + backend choice), for `attnkit.explain`
PLANNERS = {"decode_attention": decode.plan, "dense_attention": dense.plan, "masked_attention": masked.plan,
            "sparse_attention": sparse.plan}


def explain(op: str, *args: Any, **kwargs: Any) -> Explanation:
    """Which backend `attnkit.ops.<op>(*args, **kwargs)` would run, and why the others would not."""
    from ..core.contract import AttnkitError

    if op not in PLANNERS:
        raise AttnkitError(f"op: expected one of {sorted(PLANNERS)}, got {op!r}")
    return PLANNERS[op](*args, **kwargs)[1]


__all__ = ["decode_attention", "dense_attention", "explain", "masked_attention", "sparse_attention"]
