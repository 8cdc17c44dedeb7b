"""The fused gate + top-k kernel (`kernels/selection/routed_topk.py`, MoBA's routing) against the
definition and the PyTorch tiles; in Triton's CPU interpreter at tiny shapes, on a GPU at a real size."""

from __future__ import annotations

import pytest
import torch

import attnkit.methods.moba as moba
import attnkit.methods.nsa as nsa
import attnkit.methods.router as router
from attnkit import config
from attnkit.core.contract import validate_attention
from attnkit.methods.router import block_mean, seq_view

from ..methods._cases import qkv, rows_as_sets
from ..methods.test_moba import brute_force


@pytest.fixture(autouse=True)
def small_tiles(kernel_device, monkeypatch):
    """Under the interpreter, 16 x 16 tiles: many row and column tiles at tiny shapes, and fast."""
    if kernel_device == "cpu":
        from attnkit import kernels

        mod = kernels.load_module("selection.routed_topk")
        monkeypatch.setattr(mod, "BLOCK_M", 16)
        monkeypatch.setattr(mod, "MIN_BLOCK_N", 16)


def _through(module, q, k, kernel: bool, monkeypatch, **kw):
    """`module.select` with the routing kernel allowed on this device (kernel=True) or nowhere."""
    taken = []
    real = module.routed_kernel
    monkeypatch.setattr(module, "routed_kernel", lambda *a: taken.append(real(*a)) or taken[-1])
    with config.override(routed_topk_devices=("cuda", "cpu") if kernel else ()):
        sel = module.select(q, k, **kw)
    assert (taken[-1] is not None) == kernel, "the kernel path was not taken as asked"
    return sel


def _select(q, k, kernel: bool, monkeypatch, **kw):
    return _through(moba, q, k, kernel, monkeypatch, **kw)


CASES = {  # tq, tk, Hq, Hkv, block, topk, causal
    "causal_gqa2": (37, 45, 4, 2, 4, 3, True),
    "noncausal": (20, 33, 2, 2, 5, 4, False),
    "decode_tq1": (1, 50, 4, 1, 8, 3, True),
    "topk_above_blocks": (9, 12, 2, 1, 4, 8, True),  # rows with fewer candidates than topk: -1 padding
    "many_col_tiles": (12, 70, 2, 1, 1, 5, True),  # 70 blocks: 5 column tiles of 2 chunks of 8 keys
    "topk_wider_than_a_tile": (6, 33, 2, 1, 1, 20, True),  # K = 32: one chunk per 32-column tile
    "topk1_own_only": (16, 16, 2, 2, 4, 1, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_selection_is_the_definition(kernel_device, monkeypatch, config_override, case, dtype):
    tq, tk, hq, hkv, block, topk, causal = CASES[case]
    q, k, _ = qkv(2, tq, tk, hq, hkv, D=16, dtype=dtype, seed=len(case))
    q, k = q.to(kernel_device), k.to(kernel_device)
    config_override(half_gemm_devices=("cuda", "cpu"))  # bf16: the split-term gate
    got = _select(q, k, True, monkeypatch, block_size=block, topk=topk, causal=causal)
    want = _select(q, k, False, monkeypatch, block_size=block, topk=topk, causal=causal)
    assert got.indices.dtype == torch.int32 and got.indices.shape == want.indices.shape
    assert torch.equal(got.indices.cpu(), want.indices.cpu()), "kernel and PyTorch tiles select differently"
    assert rows_as_sets(got.indices.cpu()) == brute_force(q.cpu().double(), k.cpu().double(), block, topk, causal)


def test_kernel_varlen_matches_pytorch_tiles(kernel_device, monkeypatch):
    cu = torch.tensor([0, 23, 24, 61], dtype=torch.int32, device=kernel_device)
    q, k, _ = qkv(1, 61, 61, 4, 2, D=8, dtype=torch.float32, seed=5)
    q, k = q.to(kernel_device), k.to(kernel_device)
    kw = dict(block_size=4, topk=3, causal=True, cu_seqlens=cu)
    got = _select(q, k, True, monkeypatch, **kw).indices.cpu()  # [3 sequences, Hq, 37 (padded), 3]
    want = _select(q, k, False, monkeypatch, **kw).indices.cpu()
    lens = (cu[1:] - cu[:-1]).tolist()
    for n, length in enumerate(lens):  # padding rows (zero queries: all gates tie) are not part of the contract
        assert torch.equal(got[n, :, :length], want[n, :, :length]), f"sequence {n} differs"


def test_kernel_keeps_the_best_and_breaks_ties_by_index(kernel_device):
    """Raw kernel output: the own block always, then the best gates; of equal gates the larger block;
    indices ascending."""
    from attnkit import kernels

    mod = kernels.load_module("selection.routed_topk")
    q = torch.zeros(1, 1, 1, 16, device=kernel_device)
    q[..., 0] = 1.0
    means = torch.zeros(1, 1, 1, 16, 6, device=kernel_device)  # [N, Hkv, terms, D, nk]
    means[0, 0, 0, 0] = torch.tensor([0.5, 2.0, 0.5, -1.0, 3.0, -5.0])
    k_len = torch.tensor([24], device=kernel_device)
    idx = mod.routed_topk(q, means, k_len, offset=23, causal=True, block_size=4, topk=4)  # own block: 5
    assert idx.flatten().tolist() == [1, 2, 4, 5]  # 5 forced, gates 3.0, 2.0, then the tie 0.5 / 0.5 -> 2
    idx = mod.routed_topk(q, means, k_len, offset=23, causal=True, block_size=4, topk=3)  # K = 4 > width
    assert idx.flatten().tolist() == [1, 4, 5]


def test_kernel_is_the_default_and_falls_back(kernel_device, config_override):
    from attnkit import kernels

    mod = kernels.load_module("selection.routed_topk")
    dev = torch.device(kernel_device)
    assert config.Settings().routed_topk_devices == ("cuda",)  # the default on a GPU
    config_override(routed_topk_devices=("cuda", "cpu"))
    assert router.routed_kernel(dev, torch.float32, 4) is mod
    assert router.routed_kernel(dev, torch.bfloat16, mod.MAX_TOPK) is mod
    assert router.routed_kernel(dev, torch.float32, mod.MAX_TOPK + 1) is None
    assert router.routed_kernel(dev, torch.float64, 4) is None


@pytest.mark.gpu
def test_kernel_selection_at_real_size_gpu(gpu, monkeypatch):
    """T = 4096, Hq = 16, Hkv = 2, block 64, topk 16, bf16: every row is a top-16 of the float64 gate
    (a different pick only where two gates agree to float32 rounding)."""
    g = torch.Generator().manual_seed(0)
    T, bs, topk = 4096, 64, 16
    q, k = (torch.randn(1, T, h, 128, generator=g).to(gpu, torch.bfloat16) for h in (16, 2))
    got = _select(q, k, True, monkeypatch, block_size=bs, topk=topk, causal=True).indices
    want = _select(q, k, False, monkeypatch, block_size=bs, topk=topk, causal=True).indices
    same = (got.sort(-1).values == want.sort(-1).values).all(-1)
    assert same.float().mean() > 0.999, f"{int((~same).sum())} rows differ"
    call = validate_attention(q, k, k, causal=True)
    view = seq_view(call)
    means = block_mean(view.k, bs, view.k_len, torch.float64)  # [1, nk, Hkv, D]
    gate = torch.einsum("nthd,nbhd->nhtb", q.double(), means.repeat_interleave(8, dim=2))  # [1, Hq, T, nk]
    pos = torch.arange(T, device=gpu).view(1, 1, T, 1)
    blocks = torch.arange(T // bs, device=gpu).view(1, 1, 1, -1)
    gate = gate.masked_fill(blocks * bs > pos, float("-inf")).masked_fill(blocks == pos // bs, float("inf"))
    picked = gate.gather(-1, got.long().clamp_min(0)).masked_fill(got < 0, float("inf"))
    worst_picked = picked.min(-1).values
    left = gate.scatter(-1, got.long().clamp_min(0), float("-inf")).max(-1).values
    assert (worst_picked >= left - 1e-4 * left.abs().clamp_min(1)).all(), "a better block was left out"


NSA_CASES = {  # tq, tk, Hq, Hkv, block, topk, causal
    "causal_gqa4": (37, 45, 8, 2, 4, 3, True),
    "gqa1_topk_below_forced": (30, 30, 2, 2, 4, 1, True),  # rows keep max(topk, their forced blocks)
    "gqa16_tq_below_tk": (9, 40, 16, 1, 4, 5, True),
    "noncausal_tail_block": (20, 35, 4, 1, 4, 4, False),  # T not a multiple of the block
    "many_col_tiles": (12, 70, 4, 2, 1, 6, True),
}


def _nsa_select(q, k, kernel: bool, monkeypatch, **kw):
    return _through(nsa, q, k, kernel, monkeypatch, **kw)


@pytest.fixture
def small_group_tiles(kernel_device, monkeypatch):
    if kernel_device == "cpu":
        from attnkit import kernels

        monkeypatch.setattr(kernels.load_module("selection.routed_topk"), "NSA_ROWS", 16)


@pytest.mark.parametrize("case", sorted(NSA_CASES))
def test_nsa_kernel_selection_is_the_definition(kernel_device, monkeypatch, small_group_tiles, case):
    from ..methods.test_nsa import brute_force_selection

    tq, tk, hq, hkv, block, topk, causal = NSA_CASES[case]
    q, k, _ = qkv(2, tq, tk, hq, hkv, D=16, dtype=torch.float32, seed=len(case))
    q, k = q.to(kernel_device), k.to(kernel_device)
    kw = dict(block_size=block, topk=topk, causal=causal)
    got = _nsa_select(q, k, True, monkeypatch, **kw)
    want = _nsa_select(q, k, False, monkeypatch, **kw)
    assert got.indices.dtype == torch.int32 and got.indices.shape == want.indices.shape
    assert torch.equal(got.indices.cpu(), want.indices.cpu()), "kernel and PyTorch tiles select differently"
    assert rows_as_sets(got.indices.cpu()) == brute_force_selection(q.cpu().double(), k.cpu().double(), block, topk, causal)


def test_nsa_kernel_varlen_matches_pytorch_tiles(kernel_device, monkeypatch, small_group_tiles):
    cu = torch.tensor([0, 23, 24, 61], dtype=torch.int32, device=kernel_device)
    q, k, _ = qkv(1, 61, 61, 4, 2, D=8, dtype=torch.float32, seed=6)
    q, k = q.to(kernel_device), k.to(kernel_device)
    kw = dict(block_size=4, topk=4, causal=True, cu_seqlens=cu)
    got = _nsa_select(q, k, True, monkeypatch, **kw).indices.cpu()
    want = _nsa_select(q, k, False, monkeypatch, **kw).indices.cpu()
    for n, length in enumerate((cu[1:] - cu[:-1]).tolist()):
        assert torch.equal(got[n, :, :length], want[n, :, :length]), f"sequence {n} differs"


def test_explain_names_the_routing(kernel_device, config_override):
    import attnkit as ak

    q, k, v = qkv(1, 32, 32, 4, 2, D=16, dtype=torch.float32, seed=3)
    q, k, v = q.to(kernel_device), k.to(kernel_device), v.to(kernel_device)
    config_override(routed_topk_devices=("cuda", "cpu"))
    assert ak.explain(q, k, v, "moba", block_size=4, topk=3).variants[0][:2] == ("routed_topk", True)
    config_override(routed_topk_devices=())
    assert ak.explain(q, k, v, "moba", block_size=4, topk=3).variants[0][:2] == ("routed_topk", False)


@pytest.mark.gpu
def test_nsa_kernel_at_real_size_gpu(gpu, monkeypatch):
    """T = 4096, Hq = 16, Hkv = 2, block 64, topk 16, bf16: the kernel's rows equal the PyTorch tiles'
    (a different pick only where two group probabilities agree to float32 rounding)."""
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 4096, h, 128, generator=g).to(gpu, torch.bfloat16) for h in (16, 2))
    got = _nsa_select(q, k, True, monkeypatch, block_size=64, topk=16, causal=True).indices
    want = _nsa_select(q, k, False, monkeypatch, block_size=64, topk=16, causal=True).indices
    same = (got == want).all(-1)
    assert same.float().mean() > 0.999, f"{int((~same).sum())} rows differ"
