"""Hybrid stacks: which method each layer of a stack runs.

"A Systematic Analysis of Hybrid Linear Attention" and Kimi Linear interleave linear-attention
layers with full (or sparse) softmax layers at a ratio, 3:1 to 6:1 linear to full recommended.
A stack is described by one string:

- a method name for every layer: `"dense"`;
- a comma-separated pattern repeated over the depth: `"gla,gla,gla,dense"` (the number of layers
  must be a multiple of the pattern's length);
- a ratio `"3:1"`: groups of 3 `linear` layers then 1 `full` layer (methods given separately).

`make_mixer` builds the layer for one method: `LinearAttention` for the linear family,
`Attention` for every other registered method.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence, Union

import torch.nn as nn

from .. import linear as _linear  # noqa: F401  (registers the linear family)
from ..core.contract import AttnkitError
from ..registry import get_method
from .attention import Attention
from .linear import LinearAttention

_RATIO = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def layer_methods(
    layers: Union[str, Sequence[str]], num_layers: int, linear: str = "gla", full: str = "dense"
) -> list[str]:
    """The method of each of `num_layers` layers from a pattern (see the module docstring)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise AttnkitError(f"num_layers: expected an int >= 1, got {num_layers!r}")
    if isinstance(layers, str):
        m = _RATIO.match(layers)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if a + b == 0:
                raise AttnkitError(f"layers: ratio {layers!r} has no layers")
            pattern = [linear] * a + [full] * b
        else:
            pattern = [p.strip() for p in layers.split(",")]
    elif isinstance(layers, (list, tuple)):
        pattern = list(layers)
    else:
        raise AttnkitError(f"layers: expected a method name, a comma pattern or a ratio 'a:b', got {type(layers).__name__}")
    if not pattern or any(not isinstance(p, str) or not p for p in pattern):
        raise AttnkitError(f"layers: expected non-empty method names, got {layers!r}")
    if num_layers % len(pattern):
        raise AttnkitError(f"num_layers: expected a multiple of the pattern length {len(pattern)} ({layers!r}), got {num_layers}")
    for p in pattern:
        get_method(p)  # raises for unknown names
    return [pattern[i % len(pattern)] for i in range(num_layers)]


def is_linear(method: str) -> bool:
    return get_method(method).family == "linear"


def make_mixer(
    method: str,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: Optional[int] = None,
    *,
    layer_idx: Optional[int] = None,
    attention_kwargs: Optional[dict[str, Any]] = None,
    linear_kwargs: Optional[dict[str, Any]] = None,
    method_options: Optional[dict[str, Any]] = None,
) -> nn.Module:
    """One token mixer: `LinearAttention` for a linear-family `method`, else `Attention`.
    `attention_kwargs` / `linear_kwargs` are the layer settings of each kind (e.g. `rope`,
    `output_gate`; `short_conv`), `method_options` the method's own options."""
    opts = dict(method_options or {})
    if is_linear(method):
        return LinearAttention(hidden_size, num_heads, method, layer_idx=layer_idx, **(linear_kwargs or {}), **opts)
    return Attention(hidden_size, num_heads, num_kv_heads, method, layer_idx=layer_idx, **(attention_kwargs or {}), **opts)
