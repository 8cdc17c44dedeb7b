"""Small builders shared by the kv tests: random caches and the float64 oracle over kept tokens."""

from __future__ import annotations

import torch

from attnkit.core import naive_attention
from attnkit.kv.paged import PagedLayerCache


def random_cache(B: int = 2, T: int = 40, H: int = 2, D: int = 8, page_size: int = 4,
                 dtype: torch.dtype = torch.float64, seed: int = 0):
    """A filled `PagedLayerCache` and the tensors `(k, v)` `[B, T, H, D]` it holds."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(dtype)
    c = PagedLayerCache(B, H, D, page_size=page_size, dtype=dtype)
    c.append(k, v)
    return c, k, v


def oracle_over_kept(q: torch.Tensor, cache: PagedLayerCache, allowed=None) -> torch.Tensor:
    """Float64 attention of `q [B, Tq, Hq, D]` over each KV head's kept tokens (causal by position),
    written with the naive oracle one (batch, KV head) at a time; a token with log-weight log(m)
    is repeated m times. `allowed(b, h) -> bool [L]` optionally restricts logical slots."""
    B, Tq, Hq, D = q.shape
    H = cache.num_heads
    G = Hq // H
    lg = cache.logical()
    out = torch.zeros(B, Tq, Hq, cache.head_dim_v, dtype=torch.float64)
    qpos = cache.seen.view(B, 1) - Tq + torch.arange(Tq)
    for b in range(B):
        for h in range(H):
            ok = lg["valid"][b, h].clone()
            if allowed is not None:
                ok &= allowed(b, h)
            reps = torch.exp(lg["bias"][b, h]).round().long()
            idx = torch.nonzero(ok).squeeze(1)
            idx = idx.repeat_interleave(reps[idx])
            k = lg["k"][b, h, idx].double()
            v = lg["v"][b, h, idx].double()
            pos = lg["pos"][b, h, idx]
            for t in range(Tq):
                vis = pos <= qpos[b, t]
                if not bool(vis.any()):
                    continue
                qq = q[b, t, h * G:(h + 1) * G].double().view(1, 1, G, D)
                o, _ = naive_attention(qq, k[vis].view(1, -1, 1, D), v[vis].view(1, -1, 1, v.shape[-1]), causal=False)
                out[b, t, h * G:(h + 1) * G] = o[0, 0]
    return out
