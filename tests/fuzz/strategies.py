"""Hypothesis strategies for attention calls of any registered method, and the float64 oracles.

A call draws shapes (B, Tq != Tk, GQA ratios, head dims), a dtype, causality, varlen offsets with
empty sequences, and the method's options: `spec.example(call)` (which also makes learned inputs
such as gates), with its integer options redrawn near their edges. Options a method refuses for the
drawn shapes are rejected, not counted.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from hypothesis import reject
from hypothesis import strategies as st

import attnkit as ak
from attnkit.core.contract import AttnkitError, validate_attention
from attnkit.core.oracle import naive_attention
from attnkit.registry import parse_options
from attnkit.ops import executors

# integer options redrawn from small ranges (1 and "more than there are" are the edges)
INT_OPTIONS = {"block_size": (1, 8), "topk": (1, 6), "window": (1, 10), "sinks": (0, 3), "stride": (1, 6),
               "dilation": (1, 4), "chunk_size": (1, 16)}


@dataclasses.dataclass
class Case:
    """One drawn call: tensors, the keyword arguments of `attnkit.attention` and the varlen lengths."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kwargs: dict[str, Any]
    lengths: Optional[list[int]]

    @property
    def causal(self) -> bool:
        return self.kwargs["causal"]

    def run(self, q=None, k=None, v=None, **extra: Any) -> Any:  # type: ignore[no-untyped-def]
        return ak.attention(self.q if q is None else q, self.k if k is None else k, self.v if v is None else v,
                            **{**self.kwargs, **extra})


@st.composite
def cases(draw: st.DrawFn, spec: Any, causal: Optional[bool] = None, varlen: Optional[bool] = None,
          tq_above_tk: bool = False, dtypes: tuple = (torch.float32, torch.float64)) -> Case:
    cap, linear = spec.capabilities, spec.family == "linear"
    hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3])) if cap.gqa else 1
    hq, d = hkv * group, draw(st.sampled_from([4, 8]))
    dv = d if linear else draw(st.sampled_from([4, 8]))
    dtype = draw(st.sampled_from(dtypes))
    use_varlen = cap.varlen and (draw(st.booleans()) if varlen is None else varlen)
    if varlen and not cap.varlen:
        reject()
    lengths = None
    if use_varlen:
        lengths = draw(st.lists(st.integers(0, 12), min_size=1, max_size=3).filter(lambda x: sum(x) > 0))
        B, tq = 1, sum(lengths)
        tk = tq
    else:
        B, tk = draw(st.integers(1, 2)), draw(st.integers(1, 24))
        tq = tk
        if not linear and cap.decode and (tq_above_tk or draw(st.booleans())):
            tq = draw(st.integers(tk + 1, tk + 8)) if tq_above_tk else draw(st.integers(1, 24))
    if tq_above_tk and tq <= tk:
        reject()
    if causal is None:
        causal = draw(st.booleans()) if (cap.causal and cap.non_causal) else cap.causal
    elif (causal and not cap.causal) or (not causal and not cap.non_causal):
        reject()
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, tq, hq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, tk, hkv, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, tk, hkv, dv, generator=g, dtype=torch.float64).to(dtype)
    cu = None if lengths is None else torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    call = validate_attention(q, k, v, causal=causal, cu_seqlens=cu)
    torch.manual_seed(seed)  # learned inputs made by `example` (gates, indexer weights)
    opts = dict(spec.example(call))
    fields = {f.name for f in dataclasses.fields(spec.options)}
    for name, (lo, hi) in INT_OPTIONS.items():
        if name in fields and isinstance(opts.get(name, 0), int):
            opts[name] = draw(st.integers(lo, hi))
    if linear and spec.name in ("delta_rule", "gated_delta_rule", "kda"):
        opts["use_qk_l2norm_in_kernel"] = True  # raw keys make the delta rule diverge (a documented warning)
    kwargs = dict(method=spec.name, causal=causal, cu_seqlens=cu, **opts)
    try:
        ak.explain(q, k, v, **kwargs)  # validation only: options out of range for these shapes are not a case
    except AttnkitError:
        reject()
    return Case(q, k, v, kwargs, lengths)


@contextmanager
def captured_visibility() -> Iterator[dict[str, Any]]:
    """Record the mask predicate / selection that a softmax method hands to the reference executor
    (`ops.executors` builds every registered selection and mask backend on it)."""
    seen: dict[str, Any] = {}
    original = executors.run_reference

    def capture(call, mask=None, selection=None):  # type: ignore[no-untyped-def]
        seen.update(mask=mask, selection=selection, calls=seen.get("calls", 0) + 1)
        return original(call, mask=mask, selection=selection)

    executors.run_reference = capture
    try:
        yield seen
    finally:
        executors.run_reference = original


def run_seen(spec: Any, case: Case, **extra: Any) -> tuple[Any, dict[str, Any]]:
    """Run the case (`extra`: tensors or keyword overrides) and return its result with the visibility
    it used: what the method handed to `ops.executors`, or, for a method on its own backends, the
    `spec.visibility` it declares for the same call."""
    with captured_visibility() as seen:
        result = case.run(**extra)
    if seen.get("calls", 0) == 0 and spec.visibility is not None:
        q, k, v = (extra.get(n, getattr(case, n)) for n in ("q", "k", "v"))
        call = validate_attention(q, k, v, causal=case.causal, cu_seqlens=case.kwargs["cu_seqlens"])
        options = {n: x for n, x in case.kwargs.items() if n not in ("method", "causal", "cu_seqlens")}
        seen["mask"] = spec.visibility(call, parse_options(spec, call, options))
    return result, seen


def softmax_oracle(case: Case, seen: dict[str, Any], compute_dtype: Optional[torch.dtype] = torch.float64):
    """`(out, lse)` of the naive oracle over the visibility the method used (float64 by default;
    None: in the inputs' dtype, the same-dtype baseline of the 2x rule)."""
    return naive_attention(case.q, case.k, case.v, causal=case.causal, cu_seqlens=case.kwargs["cu_seqlens"],
                           mask=seen.get("mask"), selection=seen.get("selection"), compute_dtype=compute_dtype)


def linear_oracle(case: Case) -> torch.Tensor:
    """The recurrence, token by token, in float64 (the linear family's definition)."""
    x = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
         for n, t in case.kwargs.items()}
    return ak.attention(case.q.double(), case.k.double(), case.v.double(), **{**x, "backend": "reference"})
