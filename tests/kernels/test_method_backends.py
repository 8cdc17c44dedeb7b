"""Methods wired to the GPU executors (`ops.executors`): each selection method's `triton` backend
runs its own selection through the Triton kernel and must follow the 2x rule against the float64
oracle given the same selection (outputs and gradients). On the CPU the kernels run in Triton's
interpreter at tiny shapes; on a GPU the same tests run at a real size, plus NSA's mixed path and
the flex backends (FlexAttention needs CUDA)."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.core.contract import validate_attention
from attnkit.core.oracle import naive_attention
from attnkit.registry import get_method
from tests.conftest import assert_close_rule

SELECTION_METHODS = ["moba", "dsa", "power", "stochastic", "block_topk"]


def _inputs(T, Hq, Hkv, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype).requires_grad_()  # noqa: E731
    return mk(1, T, Hq, D), mk(1, T, Hkv, D), mk(1, T, Hkv, D)


def _check(method: str, backend: str, device: str, T: int, Hq: int, Hkv: int, D: int, dtype=torch.bfloat16) -> None:
    q, k, v = _inputs(T, Hq, Hkv, D, dtype, device)
    call = validate_attention(q, k, v, causal=True)
    spec = get_method(method)
    opts_kw = spec.example(call)
    opts = spec.options.parse(method, opts_kw)
    out = spec.backend(backend).run(call, opts)
    sel = getattr(ak.methods, method).policy(call, opts)
    ref, _ = naive_attention(q, k, v, causal=True, selection=sel)
    base, _ = naive_attention(q, k, v, causal=True, selection=sel, compute_dtype=None)
    assert_close_rule(out, ref, base, f"{method}/{backend} out")
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    grads = [torch.autograd.grad((x.float() * do.float()).sum(), (q, k, v)) for x in (out, ref, base)]
    for name, a, r, b in zip("qkv", *grads):
        assert_close_rule(a, r, b, f"{method}/{backend} d{name}")


@pytest.mark.parametrize("method", SELECTION_METHODS)
def test_triton_backend_of_selection_methods(method, kernel_device) -> None:
    T, Hq, Hkv, D = (24, 2, 1, 16) if kernel_device == "cpu" else (2048, 16, 4, 128)
    _check(method, "triton", kernel_device, T, Hq, Hkv, D)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["block_topk", "sliding_window", "dilated", "strided"])
def test_flex_backends_gpu(method, gpu) -> None:
    q, k, v = _inputs(2048, 16, 4, 128, torch.bfloat16, "cuda")
    call = validate_attention(q, k, v)
    opts = get_method(method).example(call)
    if method == "block_topk":
        opts["block_size"] = 128
    out = ak.attention(q, k, v, method=method, backend="flex", **opts)
    ref = ak.attention(q.double(), k.double(), v.double(), method=method, backend="reference", **opts)
    base = ak.attention(q.float(), k.float(), v.float(), method=method, backend="reference", **opts).to(torch.bfloat16)
    assert_close_rule(out, ref, base, f"{method}/flex out", factor=4.0)


@pytest.mark.gpu
def test_nsa_gpu_backend_matches_reference(gpu) -> None:
    q, k, v = _inputs(2048, 16, 4, 128, torch.bfloat16, "cuda")
    call = validate_attention(q, k, v)
    opts = get_method("nsa").example(call)
    assert ak.explain(q, k, v, method="nsa", **opts).chosen == "triton"
    out = ak.attention(q, k, v, method="nsa", **opts)
    ref = ak.attention(q, k, v, method="nsa", backend="reference", **opts)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 2e-2, f"nsa triton vs reference relative error {err:.3e}"
