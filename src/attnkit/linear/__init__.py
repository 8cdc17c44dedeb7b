"""Linear and recurrent attention, with fla's names and semantics.

Each method has three forms side by side:

- the chunked parallel form (the default; fla's Triton kernels when flash-linear-attention is
  installed and the tensors are on CUDA, else PyTorch): `gla(q, k, v, g, ...)`;
- the token-by-token recurrence, the oracle: `gla_recurrent(...)`;
- one decode step with a state: `gla_step(q, k, v, g, state)`.

Layout `[B, T, H, K]` (sequence-first), gates in log space, `scale` default `K ** -0.5`
applied to q, states `[N, H, K, V]` float32, varlen through `cu_seqlens` (B == 1).
Importing this package registers the methods with `attnkit.attention` (family "linear").
`attnkit.linear.explain("gla", q, k, v, g, ...)` (or `attnkit.explain(q, k, v, method="linear.gla",
g=g, ...)`) says which form a direct call runs and why the others would not.
"""

from .delta import (
    delta_rule,
    delta_rule_recurrent,
    delta_rule_step,
    gated_delta_rule,
    gated_delta_rule_recurrent,
    gated_delta_rule_step,
    kda,
    kda_recurrent,
    kda_step,
)
from .gla import gla, gla_recurrent, gla_step
from .linear_attn import linear_attention, linear_attention_recurrent, linear_attention_step
from .simple_gla import (
    lightning_attention,
    lightning_decay,
    simple_gla,
    simple_gla_recurrent,
    simple_gla_step,
)
from .dispatch import explain
from . import registry_entries as _registry_entries  # noqa: F401  (registers the methods)

# op name -> the direct call, for `explain` (the `_recurrent` forms are these with backend="reference")
OPS = {"linear_attention": linear_attention, "simple_gla": simple_gla, "lightning_attention": lightning_attention,
       "gla": gla, "delta_rule": delta_rule, "gated_delta_rule": gated_delta_rule, "kda": kda}

__all__ = [
    "explain",
    "linear_attention", "linear_attention_recurrent", "linear_attention_step",
    "simple_gla", "simple_gla_recurrent", "simple_gla_step",
    "lightning_attention", "lightning_decay",
    "gla", "gla_recurrent", "gla_step",
    "delta_rule", "delta_rule_recurrent", "delta_rule_step",
    "gated_delta_rule", "gated_delta_rule_recurrent", "gated_delta_rule_step",
    "kda", "kda_recurrent", "kda_step",
]
