"""Attention statistics the eviction scorers need, computed without a `T x T` tensor.

All functions take queries `q: [B, Tq, Hq, D]` with their positions `q_pos: [B, Tq]` and the kept
tokens of one layer packed as `k: [B, Hkv, N, D]` with positions `k_pos: [B, Hkv, N]` (-1 =
padding), as `PagedLayerCache.kept()` returns them; visibility is causal by position. Query
chunks bound the tile `[B, Hkv, G, Cq, N]`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.contract import compute_dtype

TILE_ELEMS = 1 << 21


def attention_probs_chunks(q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, k_pos: torch.Tensor,
                           scale: float, bias: Optional[torch.Tensor] = None, chunk: Optional[int] = None):
    """Yield `(query slice, p [B, Hkv, G, Cq, N])`: softmax probabilities of each query chunk over
    the kept keys (causal by position; padding gets 0)."""
    B, Tq, Hq, D = q.shape
    H, N = k.shape[1], k.shape[2]
    G = Hq // H
    cd = compute_dtype(q.dtype)
    kc = k.to(cd).unsqueeze(2)  # [B, Hkv, 1, N, D]
    size = chunk or max(1, TILE_ELEMS // max(1, B * Hq * N))
    for start in range(0, Tq, size):
        sl = slice(start, min(Tq, start + size))
        qc = q[:, sl].to(cd).view(B, -1, H, G, D).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, Cq, D]
        s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias.to(cd).view(B, H, 1, 1, N)
        vis = (k_pos >= 0).view(B, H, 1, 1, N) & (k_pos.view(B, H, 1, 1, N) <= q_pos[:, sl].view(B, 1, 1, -1, 1))
        s = s.masked_fill(~vis, float("-inf"))
        lse = torch.logsumexp(s, -1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isinf(lse), 0, lse))
        yield sl, p


def attention_mass(q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, k_pos: torch.Tensor, scale: float,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention each kept key receives, summed over the queries and the query heads of its KV
    group: `[B, Hkv, N]` float32/64 (H2O's accumulated attention; SnapKV's vote before pooling)."""
    B, H, N = k_pos.shape
    total = torch.zeros(B, H, N, dtype=compute_dtype(q.dtype), device=q.device)
    for _, p in attention_probs_chunks(q, q_pos, k, k_pos, scale, bias):
        total += p.sum((2, 3))
    return total


def pool1d(x: torch.Tensor, valid: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """Pool `x [..., N]` over `kernel_size` neighbouring entries (centred, stride 1); padding
    entries (`valid` False) neither contribute nor count. `pooling`: "max" or "avg"."""
    if kernel_size == 1:
        return x
    r = kernel_size // 2
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    vflat = valid.reshape(-1, 1, shape[-1]).to(x.dtype)
    if pooling == "max":
        filled = torch.where(vflat > 0, flat, torch.full_like(flat, float("-inf")))
        out = torch.nn.functional.max_pool1d(filled, kernel_size, stride=1, padding=r)
        out = torch.where(torch.isinf(out), torch.zeros_like(out), out)
    else:
        ones = torch.ones(1, 1, kernel_size, dtype=x.dtype, device=x.device)
        num = torch.nn.functional.conv1d(flat * vflat, ones, padding=r)
        den = torch.nn.functional.conv1d(vflat, ones, padding=r)
        out = num / den.clamp_min(1)
    return out[..., : shape[-1]].reshape(shape)
