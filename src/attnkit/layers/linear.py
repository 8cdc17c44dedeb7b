"""`LinearAttention`: a layer around the linear/recurrent family (`attnkit.linear`).

    x: [B, T, C] -> q, k [B, T, H, K], v [B, T, H, V] (optional short conv + SiLU)
      -> method gates from x (decay g, delta-rule beta) -> chunked form, or one recurrent step
      -> output norm RMSNorm(o) * swish(x W_g) per head -> o_proj -> [B, T, C]

Gate parametrisations follow the papers (and fla's layers), all in log space:
`gla`: `g = logsigmoid(x W1 W2) / 16` per key channel (low-rank); `simple_gla`: the same per
head; `gated_delta_rule`: `g = -exp(A) * softplus(x W + dt_bias)` per head (Mamba-2 style);
`kda`: the same per key channel (low-rank); delta rules: `beta = sigmoid(x W_b)`.
Decoding keeps the `[B, H, K, V]` float32 state (and the short-conv tails) in a `LayerCache`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import linear as _linear
from ..api import attention
from ..core.contract import AttnkitError, OptionError
from ..registry import get_method
from ._checks import check_bool, check_cache_call, check_input, check_int
from .cache import LayerCache
from .conv import ShortConvolution
from .norm import RMSNorm

# which gates each method takes: (decay kind, uses beta)
GATES: dict[str, tuple[Optional[str], bool]] = {
    "linear_attention": (None, False),
    "lightning_attention": (None, False),
    "simple_gla": ("head_logsigmoid", False),
    "gla": ("channel_logsigmoid", False),
    "delta_rule": (None, True),
    "gated_delta_rule": ("head_softplus", True),
    "kda": ("channel_softplus", True),
}
MANAGED = ("initial_state", "output_final_state", "g", "g_gamma", "beta")  # set by the layer
DELTA = ("delta_rule", "gated_delta_rule", "kda")


class _Decay(nn.Module):
    """Log-space decay `g` from x: per head `[B, T, H]` or per key channel `[B, T, H, K]`."""

    def __init__(self, kind: str, hidden: int, H: int, K: int, low_rank: int, normalizer: float) -> None:
        super().__init__()
        self.kind, self.H, self.K, self.normalizer = kind, H, K, normalizer
        out = H * K if kind.startswith("channel") else H
        self.proj = nn.Sequential(nn.Linear(hidden, low_rank, bias=False), nn.Linear(low_rank, out, bias=True)) \
            if kind.startswith("channel") else nn.Linear(hidden, out, bias=True)
        if kind.endswith("softplus"):
            # A in [1, 16] and dt in [1e-3, 1e-1] at init, as Mamba-2 / Gated DeltaNet
            self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))
            dt = torch.exp(torch.empty(out).uniform_(math.log(1e-3), math.log(1e-1)))
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        a = self.proj(x)
        if self.kind.endswith("logsigmoid"):
            g = F.logsigmoid(a.float() if a.dtype != torch.float64 else a) / self.normalizer
        else:
            A = self.A_log.exp().repeat_interleave(a.shape[-1] // self.H)
            g = -A * F.softplus(a + self.dt_bias)
        g = g.to(x.dtype)
        return g.view(B, T, self.H, self.K) if self.kind.startswith("channel") else g


class LinearAttention(nn.Module):
    """A linear-attention layer for `method` in `attnkit.linear` (fla-style names).

    `method_options` are the method's fixed options (`chunk_size`, `use_qk_l2norm_in_kernel`,
    `normalize`, `num_layers`); gates and states are made by the layer. Delta-rule methods
    normalise q and k (L2) by default, as their papers do."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        method: str = "gla",
        *,
        head_dim: Optional[int] = None,
        expand_v: float = 1.0,
        short_conv: bool = False,
        conv_size: int = 4,
        output_norm: bool = True,
        output_gate: bool = True,
        gate_low_rank: int = 16,
        gate_normalizer: float = 16.0,
        norm_eps: float = 1e-5,
        layer_idx: Optional[int] = None,
        backend: str = "auto",
        **method_options: Any,
    ) -> None:
        super().__init__()
        self.hidden_size = check_int("hidden_size", hidden_size)
        self.num_heads = H = check_int("num_heads", num_heads)
        spec = get_method(method)
        if spec.family != "linear":
            raise AttnkitError(f"method: {method!r} is a {spec.family} method; use attnkit.layers.Attention for it")
        if method not in GATES:
            raise AttnkitError(f"method: LinearAttention knows the gates of {sorted(GATES)}, got {method!r}")
        if head_dim is None and hidden_size % num_heads:
            raise AttnkitError(f"head_dim: hidden_size {hidden_size} is not divisible by num_heads {num_heads}; pass head_dim")
        self.head_dim = K = hidden_size // num_heads if head_dim is None else check_int("head_dim", head_dim)
        if not isinstance(expand_v, (int, float)) or isinstance(expand_v, bool) or expand_v <= 0 or (K * expand_v) % 1:
            raise AttnkitError(f"expand_v: expected a float > 0 with head_dim * expand_v an int, got {expand_v!r}")
        self.head_dim_v = V = int(K * expand_v)
        self.method, self.layer_idx, self.backend = method, layer_idx, backend
        for name in MANAGED:
            if name in method_options:
                raise OptionError(f"{name}: set by the LinearAttention layer (gates from x, state from the cache); do not pass it")
        opts = dict(method_options)
        if method == "lightning_attention" and "layer_idx" not in opts and layer_idx is not None:
            opts["layer_idx"] = layer_idx
        if method in DELTA:
            opts.setdefault("use_qk_l2norm_in_kernel", True)
        self.method_options = opts

        self.q_proj = nn.Linear(hidden_size, H * K, bias=False)
        self.k_proj = nn.Linear(hidden_size, H * K, bias=False)
        self.v_proj = nn.Linear(hidden_size, H * V, bias=False)
        self.o_proj = nn.Linear(H * V, hidden_size, bias=False)
        self.short_conv = check_bool("short_conv", short_conv)
        if short_conv:
            self.q_conv = ShortConvolution(H * K, conv_size)
            self.k_conv = ShortConvolution(H * K, conv_size)
            self.v_conv = ShortConvolution(H * V, conv_size)
        decay, uses_beta = GATES[method]
        self.decay = _Decay(decay, hidden_size, H, K, gate_low_rank, gate_normalizer) if decay else None
        self.b_proj = nn.Linear(hidden_size, H, bias=True) if uses_beta else None
        self.norm = RMSNorm(V, eps=norm_eps) if check_bool("output_norm", output_norm) else None
        self.g_proj = nn.Linear(hidden_size, H * V, bias=False) if check_bool("output_gate", output_gate) else None
        self._check_options()

    def _check_options(self) -> None:
        spec = get_method(self.method)
        dummy: dict[str, Any] = {}
        decay, uses_beta = GATES[self.method]
        if decay:
            shape = (1, 1, self.num_heads, self.head_dim) if decay.startswith("channel") else (1, 1, self.num_heads)
            dummy["g"] = torch.zeros(shape)
        if uses_beta:
            dummy["beta"] = torch.zeros(1, 1, self.num_heads)
        spec.options.parse(self.method, {**self.method_options, **dummy})

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.method_options.items())
        return (f"method={self.method!r}{opts}, heads={self.num_heads}, head_dim={self.head_dim}, "
                f"head_dim_v={self.head_dim_v}, short_conv={self.short_conv}")

    def _proj(self, x: torch.Tensor, cache: Optional[LayerCache], cu_seqlens: Optional[torch.Tensor]):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.short_conv:
            conv = cache.conv if cache is not None else {}
            q, cq = self.q_conv(q, conv.get("q"), cu_seqlens)
            k, ck = self.k_conv(k, conv.get("k"), cu_seqlens)
            v, cv = self.v_conv(v, conv.get("v"), cu_seqlens)
            if cache is not None:
                cache.conv = {"q": cq, "k": ck, "v": cv}
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_dim, self.head_dim_v
        return q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, V)

    def forward(
        self,
        x: torch.Tensor,
        cache: Optional[LayerCache] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """`x: [B, T, C] -> [B, T, C]`; with `cache`, continue from its state (any T, 1 included)."""
        x = check_input(x, self.hidden_size)
        check_cache_call(cache, cu_seqlens, x.shape[0])
        B, T, _ = x.shape
        q, k, v = self._proj(x, cache, cu_seqlens)
        made: dict[str, torch.Tensor] = {}
        if self.decay is not None:
            made["g"] = self.decay(x)
        if self.b_proj is not None:
            made["beta"] = torch.sigmoid(self.b_proj(x))
        if cache is None:
            o = attention(q, k, v, method=self.method, cu_seqlens=cu_seqlens, backend=self.backend,
                          **self.method_options, **made)
        else:
            o, cache.state = self._continue(q, k, v, made, cache.state)
            cache.seen += T
        if self.norm is not None:
            o = self.norm(o, self.g_proj(x).view(B, T, self.num_heads, -1) if self.g_proj is not None else None)
        elif self.g_proj is not None:
            o = o * F.silu(self.g_proj(x).view(B, T, self.num_heads, -1))
        return self.o_proj(o.reshape(B, T, -1))

    def _continue(self, q, k, v, made: dict[str, torch.Tensor], state: Optional[torch.Tensor]):
        """Run from `state` and return the new one: the recurrent step for one token, else the
        chunked form with `initial_state`."""
        step = getattr(_linear, f"{self.method}_step", None)
        if q.shape[1] == 1 and step is not None and not self.method_options.get("normalize", False):
            extra = {n: self.method_options[n] for n in ("use_qk_l2norm_in_kernel",) if n in self.method_options}
            return step(q, k, v, state=state, **made, **extra)
        if state is not None:
            state = state.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        return attention(q, k, v, method=self.method, backend=self.backend, initial_state=state,
                         output_final_state=True, **self.method_options, **made)
