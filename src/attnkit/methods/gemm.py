"""Precision of the selections' score GEMMs: float32 results from half-precision operands where
the hardware gives them exactly (tensor cores, float32 accumulation), float32 otherwise."""

from __future__ import annotations

import torch

from .. import config
from ..core.contract import compute_dtype


_HALF = (torch.float16, torch.bfloat16)
_out_dtype_bmm_ok = True


def half_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a selection's score GEMM should keep `dtype` operands on `device` (see `bmm_f32`)."""
    return device.type in config.get().half_gemm_devices and dtype in _HALF


def bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` (batched, 3-d) accumulated and returned in float32 (float64 for float64 inputs).

    Half-precision CUDA operands stay half: their products are exact in float32 and cuBLAS
    accumulates in float32, so the result equals the float32 product of the same values up to
    summation order, on the tensor cores instead of the much slower float32 SIMT path. Other
    operands are cast to the compute dtype first."""
    global _out_dtype_bmm_ok
    if _out_dtype_bmm_ok and a.is_cuda and a.dtype in _HALF and b.dtype == a.dtype:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError):  # a torch without bmm(out_dtype=): float32 from now on
            _out_dtype_bmm_ok = False
    cd = compute_dtype(a.dtype if a.dtype == torch.float64 or b.dtype != torch.float64 else b.dtype)
    return torch.bmm(a.to(cd), b.to(cd))


def split_half(x: torch.Tensor, dtype: torch.dtype, terms: int = 3) -> list[torch.Tensor]:
    """`x` (float32) as a sum of `terms` tensors of a half dtype, each the rounding of what is left.

    Three bf16 terms carry float32's 24 bits of mantissa (bf16 shares its exponent range, so no
    term underflows before float32 would): `q . x` computed as one bf16 GEMM over the concatenated
    terms (`bmm_f32`) equals the float32 product up to float32 rounding, on the tensor cores.
    For float16 the small terms can fall into its subnormals: use it with care."""
    parts, rest = [], x
    for _ in range(terms):
        part = rest.to(dtype)
        parts.append(part)
        rest = rest - part.to(rest.dtype)
    return parts
