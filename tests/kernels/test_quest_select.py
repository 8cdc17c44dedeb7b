"""Quest's selection kernels (`kernels/selection/quest.py`): page bounds and top pages against the
PyTorch form and the definition (`kv.sparse.top_pages`: the k best, ties to the smaller page, -inf
pages never listed); in Triton's CPU interpreter at tiny shapes, on a GPU at the decode target's
size; and a decode step replayed from a CUDA graph."""

from __future__ import annotations

import contextlib

import pytest
import torch

from attnkit import config, kernels
from attnkit.kv.paged import PagedLayerCache
from attnkit.kv.sparse import Quest, top_pages


def _cache(B, T, H, D, ps, dtype, device, seed=0, holes=True, ties=False):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, T, H, D, generator=g)
    if ties:  # integer keys: many pages share a bound exactly
        k = torch.randint(-2, 3, (B, T, H, D), generator=g).float()
    v = torch.randn(B, T, H, D, generator=g)
    c = PagedLayerCache(B, H, D, page_size=ps, dtype=dtype, device=device)
    c.append(k.to(device, dtype), v.to(device, dtype))
    if holes:  # a page emptied, a page partly freed
        c.evict(torch.tensor([[[ps * 2 + j for j in range(ps)] + [1]] * H] * B, device=device))
    return c


def _rows(idx: torch.Tensor) -> list[list[int]]:
    """Each row as a sorted list of its pages (padding dropped)."""
    flat = idx.reshape(-1, idx.shape[-1]).cpu()
    return [sorted(x for x in r.tolist() if x >= 0) for r in flat]


def _both(q, c, topk):
    """(kernel path, PyTorch path) selections of one Quest step."""
    quest = Quest(topk=topk)
    scale = q.shape[-1] ** -0.5
    fast = quest.select(q, c, scale).indices
    with config.override(quest_kernel_devices=(), quest_radix_devices=()):
        ref = quest.select(q, c, scale).indices
    return fast, ref


@pytest.fixture
def on_kernels(kernel_device):
    with config.override(quest_kernel_devices=(kernel_device,), quest_radix_devices=(kernel_device,)):
        assert kernels.module_for("selection.quest", torch.device(kernel_device), (kernel_device,)) is not None
        yield kernel_device


@pytest.mark.parametrize("tq,hq", [(1, 4), (1, 16), (3, 8)])  # 4 and 8 rows: row by row; 16, 24: the matmul form
def test_page_bounds_kernel_matches_pytorch(on_kernels, tq, hq):
    dev = on_kernels
    c = _cache(2, 70, 2, 16, 4, torch.bfloat16, dev)
    q = torch.randn(2, tq, hq, 16, generator=torch.Generator().manual_seed(1)).to(dev, torch.bfloat16)
    for force in (False, True):
        got = Quest().page_scores(q, c, force_newest=force)
        with config.override(quest_kernel_devices=()):
            want = Quest().page_scores(q, c, force_newest=force)
        assert torch.equal(torch.isposinf(got), torch.isposinf(want)) and torch.equal(torch.isneginf(got),
                                                                                        torch.isneginf(want))
        fin = torch.isfinite(want)
        err = (got - want)[fin].abs().max().item()
        assert err <= 1e-5 * (1 + want[fin].abs().max().item()), f"bounds differ by {err}"
        assert torch.isneginf(got[..., 2]).all()  # the emptied page
        if force:
            assert torch.isposinf(got[..., 70 // 4]).all()  # the page of the decode queries


@pytest.mark.parametrize("topk", [1, 3, 7, 18, 40])  # 18 = every page, 40 > pages: -inf pages are not listed
def test_top_pages_equal_the_definition_with_ties(on_kernels, topk):
    dev = on_kernels
    c = _cache(2, 70, 2, 16, 4, torch.float32, dev, ties=True)
    q = torch.randint(-2, 3, (2, 1, 4, 16), generator=torch.Generator().manual_seed(2)).float().to(dev)
    s = Quest().page_scores(q, c, force_newest=True)
    assert s.isfinite().any() and (s.unsqueeze(-1) == s.unsqueeze(-2)).sum() > s.numel()  # ties exist
    fast, ref = _both(q, c, topk)
    assert fast.dtype == torch.int32 and fast.shape == ref.shape == (2, 2, 1, min(topk, 18))
    assert _rows(fast) == _rows(ref)
    assert _rows(ref) == _rows(top_pages(s.cpu(), topk))
    for row, sc in zip(_rows(ref), s.reshape(-1, s.shape[-1]).cpu()):  # the definition, directly
        finite = [p for p in range(sc.numel()) if sc[p] > float("-inf")]
        order = sorted(finite, key=lambda p: (-float(sc[p]), p))
        assert row == sorted(order[:topk])


def test_top_pages_rows_with_only_empty_pages(on_kernels):
    dev = on_kernels
    mod = kernels.load_module("selection.quest")
    s = torch.full((3, 9), float("-inf"), device=dev)
    s[1, 4] = 2.0
    s[2, :] = 1.0
    got = mod.quest_top_pages(s, 4).cpu()
    assert got[0].tolist() == [-1] * 4 and _rows(got[1:2]) == [[4]] and _rows(got[2:3]) == [[0, 1, 2, 3]]


@pytest.mark.gpu
def test_quest_selection_at_the_decode_target_size(gpu):
    """B=8, Hq=32, Hkv=8, D=128, bf16, page 16, 1/8 of the pages, at 16K tokens (the kernels' shapes
    at 128K but a smaller pool): the same pages as the PyTorch definition."""
    torch.manual_seed(0)
    B, T, Hq, H, D = 8, 16384, 32, 8, 128
    c = PagedLayerCache(B, H, D, page_size=16, dtype=torch.bfloat16, device="cuda")
    c.append(torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16),
             torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16))
    q = torch.randn(B, 1, Hq, D, device="cuda", dtype=torch.bfloat16)
    fast = Quest(topk=T // 16 // 8).select(q, c, D ** -0.5).indices
    s = Quest().page_scores(q, c, force_newest=True)
    assert _rows(fast) == _rows(top_pages(s, T // 16 // 8))
    with config.override(quest_kernel_devices=()):
        s_ref = Quest().page_scores(q, c, force_newest=True)
    fin = torch.isfinite(s_ref)
    err = (s - s_ref)[fin].abs().max().item()
    assert torch.equal(fin, torch.isfinite(s)) and err <= 1e-5 * (1 + s_ref[fin].abs().max().item()), err


@pytest.mark.gpu
def test_quest_decode_step_runs_under_a_cuda_graph(gpu):
    """`Quest.attend` (selection, then the decode op) captured once and replayed: the same output as
    eager, and the replay follows new queries (nothing was baked in by a host sync)."""
    torch.manual_seed(0)
    B, T, Hq, H, D = 2, 4096, 8, 2, 64
    c = PagedLayerCache(B, H, D, page_size=16, dtype=torch.bfloat16, device="cuda")
    c.append(torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16),
             torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16))
    c.page_bounds()
    quest = Quest(topk=32)
    q = torch.randn(B, 1, Hq, D, device="cuda", dtype=torch.bfloat16)

    def step():
        return quest.attend(q, c)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up: compile and autotune outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    for seed in (1, 2):
        q.copy_(torch.randn(B, 1, Hq, D, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, step()), f"replay differs from eager for query seed {seed}"


def test_quest_decode_step_reads_nothing_back_to_the_host(on_kernels):
    """Selection (bound kernel, radix select) and the decode kernel through `Reader.attend`: no op
    that would sync a GPU (the CPU twin of the CUDA-graph test); an untrusted selection of the same
    pages is validated by reading it back, which the same counter sees."""
    from attnkit.core.selection import KVSelection
    from attnkit.ops.decode import decode_attention

    from .helpers import host_reads

    dev = on_kernels
    c = _cache(2, 70, 2, 16, 4, torch.bfloat16, dev)
    c.page_bounds()
    q = torch.randn(2, 1, 4, 16, generator=torch.Generator().manual_seed(3)).to(dev, torch.bfloat16)
    quest = Quest(topk=5)
    # the decode op takes its interpreter twin only while TRITON_INTERPRET=1 is visible
    with config.triton_interpret_set() if dev == "cpu" else contextlib.nullcontext():
        assert host_reads(lambda: quest.attend(q, c, backend="triton")) == {}
        sel = quest.select(q, c, 0.25)
        untrusted = KVSelection(sel.indices, sel.q_block, sel.k_block)
        assert host_reads(lambda: decode_attention(q, c, untrusted, backend="triton")).get(
            "aten::_local_scalar_dense", 0) >= 2
        assert torch.equal(decode_attention(q, c, untrusted, backend="triton"), quest.attend(q, c, backend="triton"))
