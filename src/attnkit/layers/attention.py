"""`Attention`: a softmax-attention layer around any registered method.

    x: [B, T, C] -> q [B, T, Hq, D], k, v [B, T, Hkv, D] -> RoPE -> attnkit.attention(method)
      -> (optional) output gate -> o_proj -> [B, T, C]

The output gate is the head-specific elementwise sigmoid gate of "Gated Attention for LLMs"
(Qiu et al., 2025), position G1: `o = attn(q, k, v) * sigmoid(x W_g)` before `o_proj`. GQA/MQA
come from `num_kv_heads < num_heads`. Methods that need per-token tensors (NSA gates, DSA's
indexer) get them from learned projections of `x` (`method_inputs`). With a `LayerCache`, calls
append to the cache, so token-by-token decoding runs the same causal rule as the full forward
(bottom-right alignment).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..api import attention
from ..core.contract import AttnkitError
from ._checks import check_bool, check_cache_call, check_input, check_int, positions_for
from .cache import LayerCache
from .method_inputs import check_options, make_inputs, softmax_spec
from .rope import RopeArg, RoPE, apply_rope, as_rope


class Attention(nn.Module):
    """Multi-head softmax attention with q/k/v/o projections, RoPE, GQA and any attnkit method.

    `method_options` go to `attnkit.attention` (e.g. `topk=8, block_size=64` for MoBA) and are
    validated at construction. `inputs` sizes the learned method inputs (DSA:
    `{"heads": 4, "dim": 32}`). After a training forward, `aux_loss` holds the method's
    auxiliary loss (DSA's indexer loss) or None; add it to the model's loss."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        method: str = "dense",
        rope: RopeArg = RoPE(),
        output_gate: bool = False,
        *,
        head_dim: Optional[int] = None,
        bias: bool = False,
        layer_idx: Optional[int] = None,
        backend: str = "auto",
        inputs: Optional[dict[str, Any]] = None,
        **method_options: Any,
    ) -> None:
        super().__init__()
        self.hidden_size = check_int("hidden_size", hidden_size)
        self.num_heads = check_int("num_heads", num_heads)
        self.num_kv_heads = num_heads if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise AttnkitError(f"num_kv_heads: expected a divisor of num_heads={num_heads}, got {num_kv_heads}")
        if head_dim is None and hidden_size % num_heads:
            raise AttnkitError(f"head_dim: hidden_size {hidden_size} is not divisible by num_heads {num_heads}; pass head_dim")
        self.head_dim = hidden_size // num_heads if head_dim is None else check_int("head_dim", head_dim)
        self.rope = as_rope(rope)
        if self.rope is not None:
            self.rope.rotary_dim(self.head_dim)  # raises for too small a fraction
        self.output_gate = check_bool("output_gate", output_gate)
        self.layer_idx, self.backend = layer_idx, backend
        self.spec = softmax_spec(method)
        self.method = self.spec.name
        self.method_options = dict(method_options)

        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(hidden_size, H * D, bias=bias)
        self.k_proj = nn.Linear(hidden_size, Hkv * D, bias=bias)
        self.v_proj = nn.Linear(hidden_size, Hkv * D, bias=bias)
        self.o_proj = nn.Linear(H * D, hidden_size, bias=bias)
        self.g_proj = nn.Linear(hidden_size, H * D, bias=True) if output_gate else None
        self.aux_loss: Optional[torch.Tensor] = None
        self.inputs = make_inputs(self.spec, self.method_options, hidden_size, hidden_size, H, inputs)
        check_options(self.spec, self.method_options, self.inputs)

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.method_options.items())
        return (f"method={self.method!r}{opts}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, rope={self.rope}, output_gate={self.output_gate}")

    def forward(
        self,
        x: torch.Tensor,
        cache: Optional[LayerCache] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """`x: [B, T, C] -> [B, T, C]`. With `cache`, `x` continues the cached tokens (prefill
        in one or several chunks, then decode one token at a time). `cu_seqlens` packs several
        sequences in one row (B == 1, no cache)."""
        x = check_input(x, self.hidden_size)
        check_cache_call(cache, cu_seqlens, x.shape[0])
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, Hkv, D)
        if self.rope is not None:
            pos = positions_for(x, cache.seen if cache is not None else 0, cu_seqlens)
            q, k = apply_rope(q, pos, self.rope), apply_rope(k, pos, self.rope)
        made: dict[str, torch.Tensor] = {}
        key_side: dict[str, torch.Tensor] = {}
        self.aux_loss: Optional[torch.Tensor] = None
        if self.inputs is not None:
            src = x.detach() if self.inputs.detach_input else x
            made = self.inputs.query_inputs(src)
            key_side = self.inputs.key_inputs(src)
        if cache is not None:
            if cache.seen and not self.spec.capabilities.decode:
                raise AttnkitError(f"cache: method {self.method!r} cannot decode (attention with fewer queries "
                                   "than keys); run it on the whole sequence without a cache")
            k, v, key_side = cache.append(k, v, key_side)
        o = attention(q, k, v, method=self.method, causal=True, cu_seqlens=cu_seqlens, backend=self.backend,
                      **self.method_options, **made, **key_side)  # [B, T, H, D]
        if self.inputs is not None and self.training and torch.is_grad_enabled():
            self.aux_loss = self.inputs.aux_loss(q, k, {**made, **key_side}, self.method_options, cu_seqlens)
        if self.g_proj is not None:
            o = o * torch.sigmoid(self.g_proj(x)).view(B, T, H, D)
        return self.o_proj(o.reshape(B, T, H * D))
