"""The ring's local kernels: each rectangle's forward (output and LSE) and its backward given the
*merged* statistics, as the ring uses them, against the float64 oracle by the 2x rule.

One query block attends to keys split into pieces (a full piece and the diagonal causal piece,
as at a zigzag step); the pieces' results merged by LSE, and the pieces' gradients summed, must
equal attention over all the keys. GPU tests run the fused kernels (cuDNN, flash); their CPU twin
runs the same checks on the reference kernel. Also: the kernel choice itself, and the ring at
world size 1 (NCCL on the GPU, gloo on the CPU) against single-process attention.
"""

from __future__ import annotations

import dataclasses
import datetime

import pytest
import torch
import torch.distributed as dist

from attnkit.core import naive_attention
from attnkit.distributed import blocks
from attnkit.distributed.pattern import CAUSAL, FULL, PARTIAL

from ..conftest import assert_close_rule


def _inputs(B, Tq, Tk, Hq, Hkv, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, Tq, Hq, D), (B, Tk, Hkv, D), (B, Tk, Hkv, D), (B, Tq, Hq, D)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]


def _oracle(q, k, v, do, compute_dtype):
    """Queries are the last Tq of Tk positions (bottom-right causal): out, lse and gradients."""
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out, lse = naive_attention(q, k, v, causal=True, compute_dtype=compute_dtype)
    out.backward(do.to(out.dtype))
    return {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def check_pieces(kernel: str, device: str, dtype: torch.dtype, Tq: int, Hq: int, Hkv: int, D: int) -> None:
    """Keys [0, 2 Tq): a full piece [0, Tq) then the diagonal causal piece [Tq, 2 Tq), as a zigzag step."""
    Tk = 2 * Tq
    q, k, v, do = _inputs(1, Tq, Tk, Hq, Hkv, D, dtype, device)
    scale = D ** -0.5
    pieces = [(slice(0, Tq), FULL), (slice(Tq, Tk), CAUSAL)]
    acc = blocks.OutputAccumulator(1, Tq, Hq, D, dtype, q.device)
    for ks, kind in pieces:
        assert blocks.choose(kernel, q, k[:, ks], v[:, ks], kind).name == kernel, f"{kernel} not chosen for {kind}"
        ob, lb = blocks.forward(q, k[:, ks], v[:, ks], scale, kind, None, kernel)
        acc.fold(0, Tq, ob, lb)
    out, lse = acc.result()
    dq = torch.zeros(q.shape, dtype=torch.float32 if dtype != torch.float64 else dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=dq.dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=dq.dtype, device=q.device)
    for ks, kind in pieces:
        gq, gk, gv = blocks.backward(do, q, k[:, ks], v[:, ks], out, lse, scale, kind, None, kernel)
        dq += gq
        dk[:, ks] += gk
        dv[:, ks] += gv
    got = {"out": out, "lse": lse, "dq": dq.to(dtype), "dk": dk.to(dtype), "dv": dv.to(dtype)}
    cpu = [x.cpu() for x in (q, k, v, do)]
    oracle = _oracle(*cpu, torch.float64)
    baseline = _oracle(*cpu, None) if dtype != torch.float64 else None
    for key in got:
        name = f"{kernel} {dtype} Tq={Tq} Hq={Hq} Hkv={Hkv} D={D} {key}"
        if baseline is None:
            err = (got[key].cpu() - oracle[key]).abs().max().item()
            assert err < 1e-9 * max(1.0, oracle[key].abs().max().item()), f"{name}: error {err:.3e}"
        else:
            assert_close_rule(got[key].cpu(), oracle[key], baseline[key], name)


@pytest.mark.parametrize("hkv", [4, 1])
def test_reference_pieces_merge_and_backward(hkv):
    check_pieces("reference", "cpu", torch.float64, Tq=24, Hq=4, Hkv=hkv, D=16)
    check_pieces("reference", "cpu", torch.float32, Tq=24, Hq=4, Hkv=hkv, D=16)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
@pytest.mark.parametrize("shape", [(256, 8, 2, 128), (384, 4, 4, 64), (1000, 8, 1, 128)],
                         ids=["gqa_d128", "mha_d64", "mqa_odd_len"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_pieces_merge_and_backward_gpu(kernel, shape, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (CPU twin: test_reference_pieces_merge_and_backward)")
    reason = blocks.why_not(kernel, torch.device("cuda"), dtype, shape[3], shape[3], FULL, shape[0], shape[0])
    if reason is not None:
        pytest.skip(f"{kernel} unavailable here: {reason}")
    Tq, Hq, Hkv, D = shape
    check_pieces(kernel, "cuda", dtype, Tq=Tq, Hq=Hq, Hkv=Hkv, D=D)


def test_pick_kernel_order_and_reasons():
    cpu = torch.device("cpu")
    choice = blocks.pick_kernel("auto", cpu, torch.float32, 64, 64, CAUSAL, 8, 8)
    assert choice.name == "reference", choice
    assert [k for k, _ in choice.why_not] == ["cudnn", "flash"], choice.why_not
    assert "runs on cuda" in choice.describe() and "fp32 not supported" in choice.describe(), choice.describe()
    assert blocks.pick_kernel("reference", cpu, torch.float32, 64, 64, FULL, 8, 8).name == "reference"
    with pytest.raises(ValueError, match="backend: 'cudnn' cannot run this ring"):
        blocks.pick_kernel("cudnn", cpu, torch.bfloat16, 64, 64, FULL, 8, 8)
    # a masked rectangle falls back to the reference even when a fused kernel was named
    assert blocks.pick_kernel("flash", cpu, torch.bfloat16, 64, 64, PARTIAL, 8, 8).name == "reference"


def test_rows_gaps_and_accumulator_first_write():
    rows = blocks.Rows(10)
    rows.add(2, 4)
    rows.add(6, 8)
    assert rows.gaps(0, 10) == [(0, 2), (4, 6), (8, 10)], rows.gaps(0, 10)
    assert rows.gaps(3, 7) == [(4, 6)], rows.gaps(3, 7)
    rows.add(4, 6)
    assert rows.spans == [(2, 8)], rows.spans
    # a result covering every row is kept as returned (no copy): the world-1 path
    ob, lb = torch.randn(1, 5, 2, 3), torch.randn(1, 2, 5)
    acc = blocks.OutputAccumulator(1, 5, 2, 3, torch.float32, torch.device("cpu"))
    acc.fold(0, 5, ob, lb)
    out, lse = acc.result()
    assert out.data_ptr() == ob.data_ptr() and torch.equal(lse, lb), "single full result was copied"
    # rows nobody wrote: output 0, LSE -inf
    acc = blocks.OutputAccumulator(1, 5, 2, 3, torch.float32, torch.device("cpu"))
    acc.fold(1, 3, ob[:, 1:3], lb[:, :, 1:3])
    out, lse = acc.result()
    assert torch.equal(out[:, 1:3], ob[:, 1:3]) and torch.all(out[:, [0, 3, 4]] == 0), "first write or zero rows wrong"
    assert torch.all(torch.isneginf(lse[:, :, [0, 3, 4]])), "unwritten rows must have LSE -inf"


def _world1_ring(device: str, backend: str, dtype: torch.dtype, T: int, causal: bool, layout: str) -> None:
    """ring_attention at world size 1 in this process equals single-process attention (2x rule)."""
    from attnkit.distributed import CommStats, ring_attention

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
    try:
        q, k, v, do = _inputs(1, T, T, 8, 2, 64, dtype, device, seed=3)
        ql, kl, vl = (x.clone().requires_grad_(True) for x in (q, k, v))
        stats = CommStats()
        out = ring_attention(ql, kl, vl, causal=causal, layout=layout, backend=backend, stats=stats)
        out.backward(do)
        assert stats.calls == 1, f"world 1 should make one attention call, made {stats.calls}"
        want = "reference" if device == "cpu" else backend
        assert list(stats.kernels) == [want], f"kernels used {stats.kernels}, expected {want}"
        got = {"out": out.detach(), "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
        cpu = [x.cpu() for x in (q, k, v, do)]
        res = {}
        for cd in (torch.float64, None):
            qs, ks, vs = (x.detach().clone().requires_grad_(True) for x in cpu[:3])
            o, _ = naive_attention(qs, ks, vs, causal=causal, compute_dtype=cd)
            o.backward(cpu[3].to(o.dtype))
            res[cd] = {"out": o.detach(), "dq": qs.grad, "dk": ks.grad, "dv": vs.grad}
        for key in got:
            assert_close_rule(got[key].cpu(), res[torch.float64][key], res[None][key], f"world-1 ring {backend} {key}")
    finally:
        if started:
            dist.destroy_process_group()


@pytest.mark.parametrize("causal,layout", [(True, "zigzag"), (False, "contiguous")])
def test_world1_ring_matches_single_process(causal, layout):
    _world1_ring("cpu", "auto", torch.float32, 64, causal, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cudnn", "flash"])
@pytest.mark.parametrize("causal,layout", [(True, "zigzag"), (False, "contiguous")])
def test_world1_ring_matches_single_process_gpu(backend, causal, layout):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (CPU twin: test_world1_ring_matches_single_process)")
    reason = blocks.why_not(backend, torch.device("cuda"), torch.bfloat16, 64, 64, FULL, 512, 512)
    if reason is not None:
        pytest.skip(f"{backend} unavailable here: {reason}")
    _world1_ring("cuda", backend, torch.bfloat16, 512, causal, layout)


def test_auto_passes_over_a_fused_kernel_that_fails(monkeypatch):
    """Under `auto`, a fused kernel that raises at run time is recorded with its error and the next
    kernel runs (and is reported); a kernel asked for by name is then refused, naming the reason."""
    real_forward = blocks._forward

    def fake_forward(name, q, k, v, scale, kind, mask):
        if name == "cudnn":
            raise RuntimeError("cuDNN attention is not supported by this build\ndetails")
        return real_forward("reference", q, k, v, scale, kind, mask)

    monkeypatch.setattr(blocks, "_FAILED", {})
    # the fused kernels' records made to accept these CPU float64 inputs, unless they failed here
    fake = tuple(b if b.name == "reference" else
                 dataclasses.replace(b, devices=("cpu",), dtypes=(torch.float64,), requires=(),
                                     supports=lambda rect, kind, n=b.name: blocks._FAILED.get((n, rect.device)))
                 for b in blocks.DECLARED)
    monkeypatch.setattr(blocks, "DECLARED", fake)
    monkeypatch.setattr(blocks, "_forward", fake_forward)
    blocks._pick.cache_clear()
    try:
        _check_fallback()
    finally:
        blocks._pick.cache_clear()  # choices made under the fake availability must not outlive the test


def _check_fallback() -> None:
    q, k, v, _ = _inputs(1, 8, 8, 2, 1, 8, torch.float64, "cpu")
    out, lse = blocks.forward(q, k, v, 8 ** -0.5, FULL, None, "auto")
    want, want_lse = blocks.blockwise_attention(q, k, v, causal=False)
    assert torch.allclose(out, want) and torch.allclose(lse, want_lse), "fallback result differs from the reference"
    choice = blocks.pick_kernel("auto", q.device, q.dtype, 8, 8, FULL, 8, 8)
    assert choice.name == "flash", choice
    assert choice.why_not == (("cudnn", "cudnn failed here: cuDNN attention is not supported by this build"),), choice
    with pytest.raises(ValueError, match="'cudnn' cannot run this ring: cudnn failed here"):
        blocks.forward(q, k, v, 8 ** -0.5, FULL, None, "cudnn")


def test_merge_is_differentiable():
    """`blocks.merge` (the LSE merge with autograd, used by the selection ring) passes gradcheck,
    through both the output and the LSE, including a row one part never saw (LSE -inf)."""
    g = torch.Generator().manual_seed(2)
    B, n, H, Dv = 1, 3, 2, 4
    parts = []
    for _ in range(2):
        out = torch.randn(B, n, H, Dv, generator=g, dtype=torch.float64)
        lse = torch.randn(B, H, n, generator=g, dtype=torch.float64)
        parts.append([out, lse])
    parts[1][0][:, 0] = 0.0
    parts[1][1][:, :, 0] = float("-inf")  # row 0: the second part saw no key
    flat = [t.requires_grad_(True) for p in parts for t in p]

    def f(*xs):
        return blocks.merge([(xs[0], xs[1]), (xs[2], xs[3])])

    # gradcheck perturbs -inf entries to -inf, so their (zero) gradient is checked as well
    assert torch.autograd.gradcheck(f, tuple(flat), eps=1e-6, atol=1e-8)
    out, lse = f(*flat)
    want_lse = torch.logaddexp(parts[0][1], parts[1][1])
    assert torch.allclose(lse, want_lse), "merged LSE differs from logaddexp"
