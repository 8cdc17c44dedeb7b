"""`attnkit.attention(...)`: one entry point for every mechanism, dispatched through the registry."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .core.contract import AttentionCall, validate_attention
from .ops._backends import run_empty
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
    **options: Any,
) -> Any:
    """Attention of `q: [B, Tq, Hq, D]` over `k: [B, Tk, Hkv, D]`, `v: [B, Tk, Hkv, Dv]`.

    Returns `out: [B, Tq, Hq, Dv]`, or `(out, lse)` with `lse: [B, Hq, Tq]` float32 when
    `return_lse=True`. `method` names a registered mechanism (`attnkit.list_methods()`), whose
    options are keyword arguments; `backend="auto"` picks the first backend that supports the
    call (`attnkit.explain` says why).
    """
    spec, call, opts = _prepare(q, k, v, method, causal, scale, cu_seqlens, return_lse, options)
    if call.empty:  # no query or no key, as SDPA: an empty output, or zeros (LSE -inf)
        return run_empty(call)
    chosen = ensure_backend(choose_backend(spec, call, opts, backend))
    return spec.backend(chosen).run(call, opts)


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
    **options: Any,
) -> Explanation:
    """For the same arguments as `attention`, say which backend would run and why the others would not.

    `method="ops.<op>"` explains an executor called directly (`ops.sparse_attention`,
    `ops.masked_attention`, `ops.dense_attention`): pass the op's own arguments (`selection=`,
    `mask=`) as keywords."""
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
