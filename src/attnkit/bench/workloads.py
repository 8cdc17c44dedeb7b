"""Benchmark inputs: q `[B, T, Hq, D]`, k and v `[B, T, Hkv, D]` plus what is known about them.

- `random`: i.i.d. Gaussian q, k, v. Attention is flat (no key stands out), the hard case for any
  sparse selection.
- `structured`: locality plus planted needles. A sinusoidal position signal in q and k makes each
  query prefer nearby keys (about 4 nats above the background at distance 0); then a few "needle"
  keys in the first half share a random direction with a few queries well after them, which adds
  about 12 nats to those (query, needle) scores, so the needle carries most of the query's
  attention mass (about 90% on average). A good selection keeps the needles; `needles` lists the planted pairs.
- `real`: q, k, v of every layer and head of a pretrained MiniLM on English text (`capture.py`),
  layers stacked along the batch dim: `[6, 512, 12, 32]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

WORKLOADS = ("random", "structured", "real")


@dataclass(frozen=True)
class Shape:
    """Synthetic input sizes (the real workload has its own)."""

    batch: int = 1
    heads_q: int = 8
    heads_kv: int = 2
    head_dim: int = 64


@dataclass
class Workload:
    name: str
    q: torch.Tensor  # [B, T, Hq, D]
    k: torch.Tensor  # [B, T, Hkv, D]
    v: torch.Tensor  # [B, T, Hkv, D]
    description: str
    needles: Optional[torch.Tensor] = None  # int64 [P, 2]: (query position, needle key position)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def seqlen(self) -> int:
        return self.q.shape[1]


def _gaussian(T: int, shape: Shape, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, Hq, Hkv, D = shape.batch, shape.heads_q, shape.heads_kv, shape.head_dim
    q = torch.randn(B, T, Hq, D, generator=gen)
    k = torch.randn(B, T, Hkv, D, generator=gen)
    v = torch.randn(B, T, Hkv, D, generator=gen)
    return q, k, v


def _finish(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype,
            device: torch.device, description: str, **extra: Any) -> Workload:
    return Workload(name, q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), description, **extra)


def random_workload(T: int, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Workload:
    """i.i.d. N(0, 1) q, k, v: flat attention."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _gaussian(T, shape, gen)
    return _finish("random", q, k, v, dtype, device, "i.i.d. Gaussian q, k, v (flat attention)")


def _position_signal(T: int, D: int) -> torch.Tensor:
    """`[T, D]` sinusoids with wavelengths log-spaced from 8 to 2T; pe(i) . pe(j) peaks at i == j."""
    pairs = D // 2
    wavelengths = torch.logspace(math.log10(8.0), math.log10(2.0 * T), pairs)
    angle = torch.arange(T, dtype=torch.float32).view(-1, 1) * (2 * math.pi / wavelengths).view(1, -1)
    pe = torch.zeros(T, D)
    pe[:, 0:2 * pairs:2], pe[:, 1:2 * pairs:2] = torch.cos(angle), torch.sin(angle)
    return pe


def plant_needles(T: int, gen: torch.Generator, num_needles: int = 4, queries_per_needle: int = 4) -> torch.Tensor:
    """`[P, 2]` (query, key) pairs: needle keys in [T/16, T/2), each read by queries at least T/8 later."""
    lo, hi = max(1, T // 16), max(2, T // 2)
    keys = lo + torch.randperm(hi - lo, generator=gen)[:num_needles]
    pairs = []
    for j in keys.tolist():
        start = min(T - 1, j + max(1, T // 8))
        qs = start + torch.randperm(T - start, generator=gen)[:queries_per_needle]
        pairs += [(i, j) for i in qs.tolist()]
    return torch.tensor(sorted(pairs), dtype=torch.int64).view(-1, 2)


def structured_workload(T: int, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0,
                        local_nats: float = 4.0, needle_nats: float = 12.0) -> Workload:
    """Locality (about `local_nats` at distance 0) plus needles (about `needle_nats` on planted pairs)."""
    gen = torch.Generator().manual_seed(seed + 1)
    q, k, v = _gaussian(T, shape, gen)
    D = shape.head_dim
    # score = q . k / sqrt(D); pe(i) . pe(i) = D / 2, so alpha^2 sqrt(D) / 2 = local_nats
    alpha = math.sqrt(2 * local_nats / math.sqrt(D))
    pe = alpha * _position_signal(T, D).view(1, T, 1, D)
    q, k = q + pe, k + pe
    needles = plant_needles(T, gen)
    gamma = math.sqrt(needle_nats * math.sqrt(D))  # gamma^2 / sqrt(D) = needle_nats
    for key in needles[:, 1].unique().tolist():
        u = torch.randn(D, generator=gen)
        u = gamma * u / u.norm()
        k[:, key] += u
        for i in needles[needles[:, 1] == key][:, 0].tolist():
            q[:, i] += u
    desc = (f"locality (~{local_nats:g} nats at distance 0) + {needles[:, 1].unique().numel()} needles read by "
            f"{needles.shape[0]} later queries (~{needle_nats:g} nats)")
    return _finish("structured", q, k, v, dtype, device, desc, needles=needles)


def real_workload(dtype: torch.dtype, device: torch.device, cache_dir: Optional[str] = None) -> Workload:
    """MiniLM's q, k, v on English text (raises `capture.Unavailable` without the eval extra)."""
    from .capture import capture_minilm

    cap = capture_minilm(cache_dir)
    desc = (f"all-MiniLM-L6-v2, {cap.meta['layers']} layers x {cap.meta['heads']} heads as batch, "
            f"{cap.meta['tokens']} tokens of {cap.meta['text_source']}")
    return _finish("real", cap.q, cap.k, cap.v, dtype, device, desc, meta=cap.meta)
