"""The selection alone: how a sparse method's policy is called, so the benchmark can time it.

End-to-end rows time selection plus executor; `select_ms` isolates the first part, so a reader sees
whether the selection dominates. The policy is found generically from the method module:

- `attnkit.methods.<name>.policy(call, opts)` (MoBA, DSA, block top-k, power, stochastic): called
  with the validated call and the parsed options, as the executor backends call it;
- any other signature `policy(call, a, b, ...)` (NSA's `policy(call, block_size, topk)`): the
  parameters after the call are filled by name from the method's options.

A method without a policy (dense, mask predicates such as sliding windows, the linear family) has no
separate selection: `selection_fn` returns None and the row reports `select_ms` as absent (null,
shown as '-'), never as zero.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Optional

from ..core.contract import AttentionCall
from ..registry import MethodSpec, parse_options


def find_policy(name: str) -> Optional[Callable[..., Any]]:
    """`attnkit.methods.<name>.policy`, or None when the method has no separate selection policy."""
    try:
        module = importlib.import_module(f"attnkit.methods.{name}")
    except ImportError:
        return None
    policy = getattr(module, "policy", None)
    return policy if callable(policy) else None


def selection_fn(spec: MethodSpec, call: AttentionCall, options: dict[str, Any]) -> Optional[Callable[[], Any]]:
    """A zero-argument callable running the method's selection on `call` with `options`, or None.

    Raises (an option error, a missing option) when the policy exists but cannot be called; the
    runner records that in the row's notes."""
    policy = find_policy(spec.name)
    if policy is None:
        return None
    params = list(inspect.signature(policy).parameters.values())[1:]  # after the call
    opts = parse_options(spec, call, options)
    if len(params) == 1 and params[0].name == "opts":
        return lambda: policy(call, opts)
    kwargs: dict[str, Any] = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if hasattr(opts, p.name):
            kwargs[p.name] = getattr(opts, p.name)
        elif p.default is inspect.Parameter.empty:
            raise TypeError(f"{spec.name}.policy: parameter {p.name!r} is not an option of the method")
    return lambda: policy(call, **kwargs)
