"""Per-token tensor inputs that some softmax-family methods need, made by learned projections.

A method declares its maker as `MethodSpec.inputs` (an `nn.Module` class with `query_names`,
`key_names`, `detach_input`, `query_inputs(xq)`, `key_inputs(xk)` and `aux_loss(...)`, built as
`cls(q_features, k_features, num_heads, options, **settings)`); this module checks the options a
layer is given against it and builds it.

Most methods take fixed options (`topk`, `block_size`, ...). Two take tensors computed from the
model's activations, which a layer must produce itself:

- `nsa` (Native Sparse Attention): gates `g_cmp, g_slc, g_swa: [B, T, Hq]` weighting its
  compressed, selected and sliding branches; the paper computes them from the input with an MLP
  and a sigmoid (`NSAGates`).
- `dsa` (DeepSeek Sparse Attention): the lightning indexer's queries `q_idx: [B, T, Hi, Di]`,
  keys `k_idx: [B, T, Di]` and head weights `w: [B, T, Hi]`, from their own projections of the
  input (`DSAIndexer`). `k_idx` is key-side: it is cached with the keys for decoding.

A maker sees query-side features `xq: [B, Tq, Fq]` and key-side features `xk: [B, Tk, Fk]`. In
`attnkit.layers.Attention` both are the layer input; in the Hugging Face integration they are
the flattened query and key states (the hidden states are not passed to attention functions).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn as nn

from ..core.contract import AttnkitError, OptionError
from ..methods import dsa, nsa
from ..registry import MethodSpec, get_method, methods


# the makers live beside their methods (one file per mechanism); their names stay importable here
NSAGates = nsa.NSAGates
DSAIndexer = dsa.DSAIndexer


def makers() -> dict[str, type]:
    """Method name -> input maker class, for every registered method that has one (`MethodSpec.inputs`)."""
    return {spec.name: spec.inputs for spec in methods() if spec.inputs is not None}


def softmax_spec(method: object) -> MethodSpec:
    """The registry spec of a softmax-family method (anything but the linear family)."""
    spec = get_method(method)
    if spec.family == "linear":
        raise AttnkitError(
            f"method: {spec.name!r} is a linear-family method; use attnkit.layers.LinearAttention for it"
        )
    return spec


def required_fields(spec: MethodSpec) -> list[str]:
    return [f.name for f in dataclasses.fields(spec.options)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def make_inputs(spec: MethodSpec, options: dict[str, Any], q_features: int, k_features: int, num_heads: int,
                settings: Optional[dict[str, Any]] = None) -> Optional[nn.Module]:
    """The input maker for `spec`, after checking that `options` leaves it nothing to guess.

    Raises `OptionError` naming the option when the user passes an input that the layer makes,
    or when the method needs a tensor input that no maker produces."""
    names = {f.name for f in dataclasses.fields(spec.options)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise OptionError(f"{unknown[0]}: not an option of method {spec.name!r} (its options: {', '.join(sorted(names))})")
    maker_cls = spec.inputs
    made = set(maker_cls.query_names + maker_cls.key_names) if maker_cls else set()
    for name in sorted(made & set(options)):
        raise OptionError(f"{name}: made by the layer from its input for method {spec.name!r}; do not pass it")
    missing = [n for n in required_fields(spec) if n not in options and n not in made]
    if missing:
        raise OptionError(f"{missing[0]}: required option of method {spec.name!r} is missing"
                          " (per-token tensor inputs can only be made for: " + ", ".join(sorted(makers())) + ")")
    if maker_cls is None:
        if settings:
            raise OptionError(f"inputs: method {spec.name!r} takes no learned inputs, got {sorted(settings)}")
        return None
    try:
        return maker_cls(q_features, k_features, num_heads, options, **(settings or {}))
    except TypeError as e:
        raise OptionError(f"inputs: bad settings {settings} for method {spec.name!r}: {e}") from None


def check_options(spec: MethodSpec, options: dict[str, Any], inputs: Optional[nn.Module]) -> None:
    """Parse the options once up front, with the made inputs of a one-token dummy, so that
    unknown names and out-of-range values fail at construction (naming the option)."""
    dummy: dict[str, Any] = {}
    if inputs is not None:
        p = next(inputs.parameters())
        with torch.no_grad():
            dummy.update(inputs.query_inputs(torch.zeros(1, 1, inputs.q_features, device=p.device, dtype=p.dtype)))
            dummy.update(inputs.key_inputs(torch.zeros(1, 1, inputs.k_features, device=p.device, dtype=p.dtype)))
    spec.options.parse(spec.name, {**options, **dummy})

