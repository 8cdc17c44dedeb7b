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

SELECTION_METHODS = [s.name for s in ak.registry.methods() if s.executor == "selection"]
PREFILL_BLOCK_METHODS = ["vertical_slash", "xattention", "flexprefill", "hip"]


def _inputs(T, Hq, Hkv, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype).requires_grad_()  # noqa: E731
    return mk(1, T, Hq, D), mk(1, T, Hkv, D), mk(1, T, Hkv, D)


def _check(method: str, backend: str, device: str, T: int, Hq: int, Hkv: int, D: int, dtype=torch.bfloat16) -> None:
    q, k, v = _inputs(T, Hq, Hkv, D, dtype, device)
    with_lse = method in PREFILL_BLOCK_METHODS
    call = validate_attention(q, k, v, causal=True, return_lse=with_lse)
    spec = get_method(method)
    opts_kw = spec.example(call)
    opts = spec.options.parse(method, opts_kw)
    res = spec.backend(backend).run(call, opts)
    out, lse = res if with_lse else (res, None)
    sel = spec.select(call, opts)
    ref, ref_lse = naive_attention(q, k, v, causal=True, selection=sel)
    base, base_lse = naive_attention(q, k, v, causal=True, selection=sel, compute_dtype=None)
    assert_close_rule(out, ref, base, f"{method}/{backend} out")
    if with_lse:
        assert_close_rule(lse, ref_lse, base_lse.float(), f"{method}/{backend} lse")
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
@pytest.mark.parametrize("method", PREFILL_BLOCK_METHODS)
def test_flex_backend_of_prefill_methods_gpu(method, gpu) -> None:
    """The flex backend at blocks of 128 against the float64 oracle given the same selection."""
    q, k, v = _inputs(4096, 16, 4, 128, torch.bfloat16, "cuda")
    call = validate_attention(q, k, v, return_lse=True)
    spec = get_method(method)
    opts = spec.options.parse(method, {**spec.example(call), "block_size": 128})
    sel = spec.select(call, opts)
    out, lse = spec.backend("flex").run(call, opts)
    ref, ref_lse = naive_attention(q, k, v, causal=True, selection=sel)
    base, base_lse = naive_attention(q, k, v, causal=True, selection=sel, compute_dtype=None)
    assert_close_rule(out, ref, base, f"{method}/flex out")
    assert_close_rule(lse, ref_lse, base_lse.float(), f"{method}/flex lse")


@pytest.mark.gpu
@pytest.mark.parametrize("method", PREFILL_BLOCK_METHODS)
def test_prefill_selection_makes_no_host_sync_gpu(method, gpu) -> None:
    """The estimation and selection of the block prefill methods stay on the device (no host sync)."""
    q, k, v = _inputs(4096, 16, 4, 128, torch.bfloat16, "cuda")
    call = validate_attention(q, k, v)
    spec = get_method(method)
    opts = spec.options.parse(method, spec.example(call))
    policy = spec.select
    policy(call, opts)  # first call: one-time probes (bmm out_dtype) may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        policy(call, opts)
    finally:
        torch.cuda.set_sync_debug_mode("default")


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


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    fa, fb = torch.where(torch.isinf(a), 0, a), torch.where(torch.isinf(b), 0, b)
    return ((fa - fb).norm() / fb.norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("tq,tk,hkv", [(10000, 10000, 4), (1, 10000, 16), (3000, 10000, 1)],
                         ids=["prefill_gqa4", "decode_group1", "tq_lt_tk_gqa16"])
def test_nsa_compressed_branch_flex_gpu(tq, tk, hkv, gpu) -> None:
    """NSA's compressed branch on compiled FlexAttention (the triton backend's path) against the reference
    executor in float64, at a real size: bf16, Tk not a multiple of the block, nc = 156 pooled keys (two
    FlexAttention blocks, the second partial); output, LSE (-inf rows included) and the gradients of q, k, v."""
    from attnkit.methods import nsa

    block, Hq, D = 64, 16, 128
    g = torch.Generator().manual_seed(3)
    mk = lambda *s: torch.randn(*s, generator=g).to("cuda", torch.bfloat16).requires_grad_()  # noqa: E731
    q, k, v = mk(1, tq, Hq, D), mk(1, tk, hkv, D), mk(1, tk, hkv, D)
    do = torch.randn(1, tq, Hq, D, generator=g).to("cuda")
    dl = torch.randn(1, Hq, tq, generator=g).to("cuda")

    def run(flex: bool, dtype: torch.dtype):
        xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out, lse, _ = nsa.compressed_branch(validate_attention(*xs), block, flex=flex)
        loss = (out.double() * do.double()).sum() + (torch.where(torch.isinf(lse), 0, lse).double() * dl.double()).sum()
        return (out.detach(), lse.detach(), *torch.autograd.grad(loss, xs))

    got, ref = run(True, torch.bfloat16), run(False, torch.float64)
    empty = torch.isinf(ref[1])
    assert torch.equal(torch.isinf(got[1]), empty), "rows that see no compressed block differ"
    assert got[1].dtype == torch.float32 and bool((got[1][empty] < 0).all())
    assert bool((got[0].transpose(1, 2)[empty] == 0).all()), "a row that sees nothing must be 0"
    assert (got[1] - ref[1])[~empty].abs().max().item() < 2e-2, "compressed LSE"
    for name, a, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        err = _rel(a, r)
        assert err < 2e-2, f"nsa compressed flex vs reference {name}: relative error {err:.3e}"


@pytest.mark.gpu
def test_nsa_triton_path_matches_reference_with_grads_gpu(gpu, monkeypatch) -> None:
    """The whole triton path (compressed branch on FlexAttention, selection from its LSE, selected
    branch on the Triton kernel, window on FlexAttention) against the reference backend at a moderate
    real size, outputs and the gradients of q, k, v and the gates; and no branch falls back to the
    reference executor."""
    from attnkit.methods import nsa

    T, Hq, Hkv, D = 9000, 16, 2, 128  # 140 pooled keys: not a multiple of FlexAttention's 128
    q, k, v = _inputs(T, Hq, Hkv, D, torch.bfloat16, "cuda", seed=4)
    g = torch.Generator().manual_seed(5)
    gates = {n: torch.sigmoid(torch.randn(1, T, Hq, generator=g)).to("cuda", torch.bfloat16).requires_grad_()
             for n in ("g_cmp", "g_slc", "g_swa")}
    opts = {"block_size": 64, "topk": 16, "window": 512}
    assert ak.explain(q, k, v, method="nsa", **opts, **gates).chosen == "triton"
    do = torch.randn(1, T, Hq, D, generator=g).to("cuda", torch.bfloat16)
    leaves = (q, k, v, *gates.values())

    def run(backend: str):
        out = ak.attention(q, k, v, method="nsa", backend=backend, **opts, **gates)
        return (out.detach(), *torch.autograd.grad((out.float() * do.float()).sum(), leaves))

    ref = run("reference")

    def no_reference(*args, **kwargs):
        raise AssertionError("the triton path ran a branch on the reference executor")

    monkeypatch.setattr(nsa, "blockwise_attention", no_reference)
    got = run("triton")
    for name, a, r in zip(("out", "dq", "dk", "dv", *gates), got, ref):
        err = _rel(a, r)
        assert err < 2e-2, f"nsa triton vs reference {name}: relative error {err:.3e}"
