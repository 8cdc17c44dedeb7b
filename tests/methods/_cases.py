"""Helpers shared by the routed-method tests: inputs, the oracle comparison (2x rule), varlen splits."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

import attnkit as ak
from attnkit.core.contract import validate_attention
from attnkit.core.oracle import naive_attention
from attnkit.core.selection import KVSelection

from ..conftest import assert_close64, assert_close_rule, max_error

# every registered method whose attention is the shared sparse executor over its selection
SELECTION_METHODS = tuple(s.name for s in ak.registry.methods() if s.executor == "selection")


def qkv(B: int, Tq: int, Tk: int, Hq: int, Hkv: int, D: int = 8, dtype: torch.dtype = torch.float32,
        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, Hq, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Tk, Hkv, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Tk, Hkv, D, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def indexer_inputs(B: int, Tq: int, Tk: int, hi: int = 3, di: int = 8, dtype: torch.dtype = torch.float32,
                   seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "q_idx": torch.randn(B, Tq, hi, di, generator=g, dtype=torch.float64).to(dtype),
        "k_idx": torch.randn(B, Tk, di, generator=g, dtype=torch.float64).to(dtype),
        "w": torch.randn(B, Tq, hi, generator=g, dtype=torch.float64).to(dtype),
    }


def options(method: str, B: int, Tq: int, Tk: int, dtype: torch.dtype, block_size: int = 4, topk: int = 2,
            **extra: Any) -> dict[str, Any]:
    """Options of a selection method for the given shapes."""
    if method == "moba":
        return {"block_size": block_size, "topk": topk, **extra}
    if method == "block_topk":
        return {"block_size": block_size, "topk": topk, "sinks": 1, "local": 1, **extra}
    if method == "power":
        return {"block_size": block_size, "sinks": 1, **extra}
    if method == "stochastic":
        return {"window": max(1, block_size), "seed": 3, **extra}
    if method == "dsa":
        return {"topk": max(1, topk * block_size), **indexer_inputs(B, Tq, Tk, dtype=dtype), **extra}
    # the training-free prefill methods: budgets that reach everything when topk blocks cover the keys
    covers = topk * block_size >= Tk
    if method == "vertical_slash":
        n = max(1, topk * block_size)
        return {"block_size": block_size, "n_vertical": n, "n_slash": n, "n_last": max(1, 2 * block_size), "sinks": 1,
                "window": 1, **extra}
    if method == "xattention":
        return {"block_size": block_size, "stride": 1, "threshold": 1.0 if covers else 0.8, **extra}
    if method == "flexprefill":
        return {"block_size": block_size, "gamma": 1.0 if covers else 0.8, "tau": 0.1, **extra}
    if method == "hip":
        return {"block_size": block_size, "topk": topk, "sinks": 1, "local": 1, **extra}
    # a method without hand-picked edge-case options: its own example for these shapes
    q = torch.zeros(B, Tq, 1, 8, dtype=dtype)
    k = torch.zeros(B, Tk, 1, 8, dtype=dtype)
    return {**ak.registry.get_method(method).example(validate_attention(q, k, k)), **extra}


def select(method: str, q: torch.Tensor, k: torch.Tensor, opts: dict[str, Any], causal: bool = True,
           cu_seqlens: Optional[torch.Tensor] = None) -> KVSelection:
    return ak.registry.get_method(method).selection(q, k, causal=causal, cu_seqlens=cu_seqlens, **opts)


def _loss(out: torch.Tensor, lse: Optional[torch.Tensor], dout: torch.Tensor, dlse: Optional[torch.Tensor]) -> torch.Tensor:
    total = (out.to(torch.float64) * dout).sum()
    if lse is not None:
        finite = torch.isfinite(lse)
        total = total + (torch.where(finite, lse, torch.zeros_like(lse)).to(torch.float64) * dlse).sum()
    return total


def run_with_grads(fn: Callable[..., Any], tensors: dict[str, torch.Tensor], dout: torch.Tensor,
                   dlse: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor], dict[str, torch.Tensor]]:
    """Run `fn(**leaves)` -> out or (out, lse); backprop a fixed cotangent; return out, lse, grads."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in tensors.items()}
    res = fn(**leaves)
    out, lse = res if isinstance(res, tuple) else (res, None)
    _loss(out, lse, dout, dlse).backward()
    grads = {n: (t.grad if t.grad is not None else torch.zeros_like(t)) for n, t in leaves.items()}
    return out.detach(), None if lse is None else lse.detach(), grads


def compare(actual_fn: Callable[..., Any], oracle_fn: Callable[..., Any], tensors: dict[str, torch.Tensor],
            with_lse: bool, label: str) -> None:
    """Outputs, LSE and every gradient of `actual_fn` against the float64 oracle.

    float32/16 inputs: the 2x rule, the baseline being `oracle_fn` run in the inputs' dtype
    (`oracle_fn(dtype=None, ...)`); float64 inputs: `assert_close64`."""
    dtype = next(iter(tensors.values())).dtype
    g = torch.Generator().manual_seed(7)
    probe = actual_fn(**{n: t.detach() for n, t in tensors.items()})
    probe_out = probe[0] if isinstance(probe, tuple) else probe
    dout = torch.randn(probe_out.shape, generator=g, dtype=torch.float64)
    dlse = torch.randn(probe[1].shape, generator=g, dtype=torch.float64) if with_lse else None
    out, lse, grads = run_with_grads(actual_fn, tensors, dout, dlse)
    t64 = {n: t.detach().to(torch.float64) for n, t in tensors.items()}
    o_out, o_lse, o_grads = run_with_grads(lambda **kw: oracle_fn(torch.float64, **kw), t64, dout, dlse)
    if dtype == torch.float64:
        assert_close64(out, o_out, f"{label} output")
        if with_lse:
            assert_close64(lse, o_lse, f"{label} lse")
        for n in tensors:
            assert_close64(grads[n], o_grads[n], f"{label} d{n}", rtol=1e-8)
        return
    b_out, b_lse, b_grads = run_with_grads(lambda **kw: oracle_fn(None, **kw), tensors, dout, dlse)
    assert_close_rule(out, o_out, b_out, f"{label} output")
    if with_lse:
        assert_close_rule(lse.float(), o_lse, b_lse.float(), f"{label} lse")
    for n in tensors:
        assert_close_rule(grads[n], o_grads[n], b_grads[n], f"{label} d{n}")


def selection_oracle(selection: KVSelection, causal: bool) -> Callable[..., Any]:
    """The float64 (or same-dtype) oracle run with a fixed selection as a dense mask."""

    def fn(dtype: Optional[torch.dtype], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
        return naive_attention(q, k, v, causal=causal, selection=selection, compute_dtype=dtype)

    return fn


def dense_causal_equal(actual: torch.Tensor, expected: torch.Tensor, label: str) -> None:
    err = max_error(actual, expected)
    assert err <= 1e-10, f"{label}: differs from dense causal attention by {err:.3e}"


def cu(lengths: list[int]) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def rows_as_sets(indices: torch.Tensor) -> list:
    """Nested lists of sorted valid ids, for order-insensitive comparisons of selection rows."""
    flat = indices.reshape(-1, indices.shape[-1]).tolist()
    return [sorted(x for x in r if x >= 0) for r in flat]
