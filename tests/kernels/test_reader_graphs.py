"""Decode readers other than Quest (`kv/sparse.py`: recycled, routed, santa) read nothing back to
the host during a decode step, so a step can be captured in a CUDA graph. Checked on the CPU by
counting the aten ops that read values back (`helpers.host_reads`), with the Triton kernels in the
interpreter; on a GPU, a step captured once and replayed equals eager as the query changes
(Quest's own checks are in `test_quest_select.py`)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from attnkit import config
from attnkit.core.contract import validate_attention
from attnkit.kv.paged import PagedLayerCache
from attnkit.kv.sparse import Recycled, Routed, Santa
from attnkit.registry import get_method, methods

from .helpers import host_reads

ROUTED = [s.name for s in methods() if s.select is not None and s.capabilities.decode]


def _cache(B, T, H, D, dtype, device, seed=0, page_size=4):
    g = torch.Generator().manual_seed(seed)
    c = PagedLayerCache(B, H, D, page_size=page_size, dtype=dtype, device=device)
    c.append(torch.randn(B, T, H, D, generator=g).to(device, dtype), torch.randn(B, T, H, D, generator=g).to(device, dtype))
    return c


def _token(c: PagedLayerCache, seed: int) -> None:
    """Append one token to every row, as a decode step does before attending."""
    g = torch.Generator().manual_seed(seed)
    B, H, D = c.batch, c.num_heads, c.head_dim
    c.append(torch.randn(B, 1, H, D, generator=g).to(c.device, c.dtype),
             torch.randn(B, 1, H, D, generator=g).to(c.device, c.dtype))


def _interpreting(dev: str):
    """The decode op takes its interpreter twin only while TRITON_INTERPRET=1 is visible."""
    return config.triton_interpret_set() if dev == "cpu" else contextlib.nullcontext()


def test_recycled_steps_read_nothing_back(kernel_device):
    dev = kernel_device
    c = _cache(2, 37, 2, 16, torch.bfloat16, dev)
    q = torch.randn(2, 1, 4, 16, generator=torch.Generator().manual_seed(1)).to(dev, torch.bfloat16)
    r = Recycled(stride=3, topk=5)
    with _interpreting(dev):
        assert host_reads(lambda: r.attend(q, c, backend="triton")) == {}  # the full step
        for step in range(2):  # the steps in between, over the recycled slots
            _token(c, step)
            assert host_reads(lambda: r.attend(q, c, backend="triton")) == {}
    assert c.state["recycled"]["step"] == 3


def test_routed_step_reads_nothing_back_through_the_kernels(kernel_device):
    """MoBA's fused gate + top-k kernel and the decode kernel (MHA: one key list per KV head); the
    same step over a cache that cannot vouch for its prefix checks it on the device and reads it
    back, which the same counter sees (the control). (NSA's fused path is not checked here: on the
    CPU its compressed branch runs the blockwise reference, which skips empty tiles by reading
    them back; on CUDA it runs FlexAttention, checked by the GPU test below.)"""
    dev = kernel_device
    c = _cache(2, 45, 4, 16, torch.bfloat16, dev)
    q = torch.randn(2, 1, 4, 16, generator=torch.Generator().manual_seed(2)).to(dev, torch.bfloat16)
    r = Routed("moba", {"block_size": 8, "topk": 3})
    with config.override(routed_topk_devices=(dev,)), _interpreting(dev):
        assert c.prefix == 45
        assert host_reads(lambda: r.attend(q, c, backend="triton")) == {}
        fast = r.attend(q, c, backend="triton")
        c.prefix = None
        assert host_reads(lambda: r.attend(q, c, backend="triton")).get("aten::_local_scalar_dense", 0) >= 2
        assert torch.equal(r.attend(q, c, backend="triton"), fast)


@pytest.mark.parametrize("method", ROUTED)
def test_routed_selection_of_every_method_reads_nothing_back(method):
    """Every registered selection, on its PyTorch path, through `Routed` and the reference decode."""
    c = _cache(2, 40, 2, 8, torch.float32, "cpu")
    q = torch.randn(2, 1, 4, 8, generator=torch.Generator().manual_seed(3))
    k = torch.zeros(2, 40, 2, 8)
    spec = get_method(method)
    r = Routed(method, spec.example(validate_attention(q, k, k, causal=True)))
    assert host_reads(lambda: r.attend(q, c, backend="reference")) == {}


def test_santa_reads_nothing_back():
    c = _cache(2, 30, 2, 8, torch.float32, "cpu")
    q = torch.randn(2, 1, 4, 8, generator=torch.Generator().manual_seed(4))
    assert host_reads(lambda: Santa(samples=8).attend(q, c)) == {}


def _capture(step):
    """`(graph, out)`: `step()` warmed up on a side stream (compile and autotune), then captured."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    return g, out


def _new_query(q: torch.Tensor, seed: int) -> None:
    q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(q.device, q.dtype))


@pytest.mark.gpu
def test_recycled_step_runs_under_a_cuda_graph(gpu):
    """A step between full steps, captured and replayed: equal to eager (the step counter put back
    before each eager step), following new queries."""
    B, T, Hq, H, D = 2, 4096, 8, 2, 64
    c = _cache(B, T, H, D, torch.bfloat16, "cuda", page_size=16)
    q = torch.randn(B, 1, Hq, D, device="cuda", dtype=torch.bfloat16)
    r = Recycled(stride=4, topk=256)
    r.attend(q, c)  # the full step: remembers the slots
    _token(c, 1)
    st = c.state["recycled"]

    def step():
        st["step"] = 1
        return r.attend(q, c)

    g, out = _capture(step)
    for seed in (2, 3):
        _new_query(q, seed)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, step()), f"replay differs from eager for query seed {seed}"


@pytest.mark.gpu
@pytest.mark.parametrize("method, hq, H", [("moba", 4, 4),  # MHA
                                           ("nsa", 8, 2)])  # GQA, one selection per KV head
def test_routed_step_runs_under_a_cuda_graph(gpu, method, hq, H):
    """MoBA's and NSA's selections at the decode query, then the decode kernel, captured and replayed:
    equal to eager, following new queries."""
    B, T, D = 2, 4096, 64
    c = _cache(B, T, H, D, torch.bfloat16, "cuda", page_size=16)
    q = torch.randn(B, 1, hq, D, device="cuda", dtype=torch.bfloat16)
    r = Routed(method, {"block_size": 64, "topk": 8})
    g, out = _capture(lambda: r.attend(q, c))
    for seed in (2, 3):
        _new_query(q, seed)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, r.attend(q, c)), f"{method}: replay differs from eager for query seed {seed}"
