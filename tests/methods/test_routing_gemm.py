"""`bmm_f32` and `split_half`: the selection GEMMs' precision contract (methods/gemm.py)."""

from __future__ import annotations

import torch

from attnkit.methods.gemm import bmm_f32, split_half


def test_bmm_f32_returns_float32_products_of_half_inputs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 16, generator=g).to(torch.bfloat16)
    b = torch.randn(3, 16, 7, generator=g).to(torch.bfloat16)
    out = bmm_f32(a, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, a.double().bmm(b.double()).float(), rtol=1e-6, atol=1e-6)


def test_bmm_f32_keeps_float64():
    a, b = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    out = bmm_f32(a, b)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, a.bmm(b), rtol=0, atol=0)


def test_split_half_gemm_equals_float32_gemm():
    """q . (sum of the three bf16 terms of x) is the float32 q . x: what MoBA's gate relies on."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 9, 32, generator=g).to(torch.bfloat16)
    x = torch.randn(2, 32, 11, generator=g) / 7.0  # float32 block means (not bf16 values)
    terms = split_half(x, torch.bfloat16)
    fused = bmm_f32(torch.cat([q] * 3, -1), torch.cat(terms, 1))
    exact = q.double().bmm(x.double())
    assert (fused.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    assert (bmm_f32(q, terms[0]).double() - exact).abs().max() > 1e-4 * exact.abs().max()  # one term is not
