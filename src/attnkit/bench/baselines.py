"""Baselines measured in the same run as the methods: exact attention by other libraries' kernels.

- `sdpa`: `torch.nn.functional.scaled_dot_product_attention`, PyTorch's own dispatch (flash /
  cuDNN / memory-efficient on CUDA, a flash-style CPU kernel on CPU). Every method's `speedup` is
  this row's time divided by the method's time, on the same workload, length and dtype.
- CUDA only: `sdpa-flash`, `sdpa-cudnn`, `sdpa-efficient` (one SDPA kernel forced each) and
  `flex` (FlexAttention, compiled, with a causal block mask built outside the timed region).

The linear family's fla kernels are measured through the methods' own `fla` backend (the row's
`backend` column says which backend ran; `--backends all` adds attnkit's chunked form beside it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ..core import availability

Fn = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Baseline:
    name: str
    summary: str
    # why it cannot run on these inputs, or None
    why_not: Callable[[torch.Tensor], Optional[str]]
    # a zero-argument callable computing out `[B, T, Hq, Dv]` for q, k, v (sequence-first), causal, scale
    make: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], Fn]


def _bhtd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def _sdpa(kernel: Optional[str]) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], Fn]:
    def make(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> Fn:
        qh, kh, vh = _bhtd(q), _bhtd(k), _bhtd(v)
        gqa = q.shape[2] != k.shape[2]

        if kernel is None:
            def run() -> torch.Tensor:
                return F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale, enable_gqa=gqa).transpose(1, 2)

            return run
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, kernel)

        def run_forced() -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale, enable_gqa=gqa).transpose(1, 2)

        return run_forced

    return make


def _cuda_only(q: torch.Tensor) -> Optional[str]:
    return None if q.device.type == "cuda" else "CUDA only"


def _half_cuda(q: torch.Tensor) -> Optional[str]:
    if q.device.type != "cuda":
        return "CUDA only"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"needs fp16/bf16, inputs are {q.dtype}"
    return None


_FLEX_COMPILED: dict[str, Any] = {}


def _flex_why_not(q: torch.Tensor) -> Optional[str]:
    if q.device.type != "cuda":
        return "CUDA only"
    return availability.flex()


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> Fn:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX_COMPILED:
        _FLEX_COMPILED["fn"] = torch.compile(flex_attention)
    flex = _FLEX_COMPILED["fn"]
    T, S = q.shape[1], k.shape[1]
    off = S - T

    def causal_mod(b: Any, h: Any, qi: Any, kj: Any) -> Any:
        return kj <= qi + off

    block_mask = create_block_mask(causal_mod, None, None, T, S, device=q.device) if causal else None
    qh, kh, vh = _bhtd(q), _bhtd(k), _bhtd(v)
    gqa = q.shape[2] != k.shape[2]

    def run() -> torch.Tensor:
        return flex(qh, kh, vh, block_mask=block_mask, scale=scale, enable_gqa=gqa).transpose(1, 2)

    return run


BASELINES = (
    Baseline("sdpa", "PyTorch SDPA, default kernel choice", lambda q: None, _sdpa(None)),
    Baseline("sdpa-flash", "PyTorch SDPA, FlashAttention kernel", _half_cuda, _sdpa("FLASH_ATTENTION")),
    Baseline("sdpa-cudnn", "PyTorch SDPA, cuDNN kernel", _half_cuda, _sdpa("CUDNN_ATTENTION")),
    Baseline("sdpa-efficient", "PyTorch SDPA, memory-efficient kernel", _cuda_only, _sdpa("EFFICIENT_ATTENTION")),
    Baseline("flex", "FlexAttention (torch.compile), causal block mask", _flex_why_not, _flex),
)


def for_device(device: torch.device) -> list[Baseline]:
    """The baselines that exist on this kind of device (CUDA-only ones are not listed on CPU)."""
    if device.type == "cuda":
        return list(BASELINES)
    return [b for b in BASELINES if b.why_not(torch.empty(0)) is None]
