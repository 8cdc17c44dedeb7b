"""`attnkit.attention(...)`: one entry point for every mechanism, dispatched through the registry."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from .core.contract import AttentionCall, AttnkitError, from_bhtd, to_bhtd, validate_attention
from .ops.executors import run_empty
from .registry import (Explanation, MethodOptions, MethodSpec, check_capabilities, choose_backend, ensure_backend,
                       get_method, parse_options)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: str = "dense",
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    return_lse: bool = False,
    layout: Optional[str] = None,
    **options: Any,
) -> Any:
    """Attention of `q: [B, Tq, Hq, D]` over `k: [B, Tk, Hkv, D]`, `v: [B, Tk, Hkv, Dv]`.

    Returns `out: [B, Tq, Hq, Dv]`, or `(out, lse)` with `lse: [B, Hq, Tq]` float32 when
    `return_lse=True`. `method` names a registered mechanism (`attnkit.list_methods()`), whose
    options are keyword arguments; `backend="auto"` picks the first backend that supports the
    call (`attnkit.explain` says why).

    `layout="bhtd"` takes q, k, v as `[B, H, T, D]` (SDPA, Hugging Face) and returns `out` in that
    layout; `"bthd"` is the default. A `[B, H, T, D]` tensor read as `[B, T, H, D]` gives a result
    of the right shape and wrong values, so when `layout` is not given and the shapes look like
    that mistake (more "heads" than 64 and than "tokens", in q or k) a warning says so.
    """
    q, k, v = _in_layout(q, k, v, layout)
    spec, call, opts = _prepare(q, k, v, method, causal, scale, cu_seqlens, return_lse, options)
    if call.empty:  # no query or no key, as SDPA: an empty output, or zeros (LSE -inf)
        result = run_empty(call)
    else:
        chosen = ensure_backend(choose_backend(spec, call, opts, backend))
        result = spec.backend(chosen).run(call, opts)
    if layout != "bhtd":
        return result
    return (to_bhtd(result[0]), result[1]) if isinstance(result, tuple) else to_bhtd(result)


LAYOUTS = ("bthd", "bhtd")
_SUSPECT_HEADS = 64  # more "heads" than this (and than "tokens") looks like [B, H, T, D] read as [B, T, H, D]


def _in_layout(q: Any, k: Any, v: Any, layout: Optional[str]) -> tuple[Any, Any, Any]:
    """q, k, v as `[B, T, H, D]` from the declared layout; the shape warning when none is declared."""
    if layout is not None and layout not in LAYOUTS:
        raise AttnkitError(f"layout: expected one of {LAYOUTS} (or None for 'bthd'), got {layout!r}")
    tensors = [x for x in (q, k) if isinstance(x, torch.Tensor) and x.dim() == 4]
    if layout == "bhtd":
        return tuple(from_bhtd(x) if isinstance(x, torch.Tensor) and x.dim() == 4 else x for x in (q, k, v))
    if layout is None and any(x.shape[2] > max(_SUSPECT_HEADS, x.shape[1]) for x in tensors):
        shapes = ", ".join(str(tuple(x.shape)) for x in tensors)
        warnings.warn(f"q, k: shapes {shapes} read as [B, T, H, D] have more heads than tokens; if they are "
                      "[B, H, T, D] (SDPA / Hugging Face layout), pass layout='bhtd' or use attnkit.from_bhtd; "
                      "pass layout='bthd' to silence this", UserWarning, stacklevel=3)
    return q, k, v


def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: str = "dense",
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    return_lse: bool = False,
    layout: Optional[str] = None,
    **options: Any,
) -> Explanation:
    """For the same arguments as `attention`, say which backend would run and why the others would not.

    `method="ops.<op>"` explains an executor called directly (`ops.sparse_attention`,
    `ops.masked_attention`, `ops.dense_attention`): pass the op's own arguments (`selection=`,
    `mask=`) as keywords. `method="linear.<op>"` explains a linear-family call made directly
    (`linear.gla`, `linear.kda`, ...): pass its gates and options (`g=`, `beta=`, `initial_state=`,
    `chunk_size=`) as keywords; those ops are causal and return no LSE."""
    q, k, v = _in_layout(q, k, v, layout)
    if isinstance(method, str) and method.startswith("linear."):
        from . import linear

        if not causal or return_lse:
            raise AttnkitError(f"{'causal' if not causal else 'return_lse'}: {method} is causal only and has no LSE")
        return linear.explain(method[7:], q, k, v, scale=scale, cu_seqlens=cu_seqlens, backend=backend, **options)
    if isinstance(method, str) and method.startswith("ops."):
        from . import ops

        return ops.explain(method[4:], q, k, v, causal=causal, scale=scale, cu_seqlens=cu_seqlens, backend=backend,
                           return_lse=return_lse, **options)
    spec, call, opts = _prepare(q, k, v, method, causal, scale, cu_seqlens, return_lse, options)
    return choose_backend(spec, call, opts, backend)


def _prepare(q: Any, k: Any, v: Any, method: str, causal: bool, scale: Optional[float],
             cu_seqlens: Optional[torch.Tensor], return_lse: bool,
             options: dict[str, Any]) -> tuple[MethodSpec, AttentionCall, MethodOptions]:
    """Validate everything (inputs, capabilities, options) before any computation."""
    spec = get_method(method)
    call = validate_attention(q, k, v, causal=causal, scale=scale, cu_seqlens=cu_seqlens, return_lse=return_lse,
                              allow_empty=True)
    check_capabilities(spec, call)
    return spec, call, parse_options(spec, call, options)
