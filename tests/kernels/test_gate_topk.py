"""MoBA's fused gate + top-k kernel (`kernels/selection/gate_topk.py`) against the definition and the PyTorch
tiles; in Triton's CPU interpreter at tiny shapes, on a GPU at a real size."""

from __future__ import annotations

import pytest
import torch

import attnkit.methods.moba as moba
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

        mod = kernels.load_module("selection.gate_topk")
        monkeypatch.setattr(mod, "BLOCK_M", 16)
        monkeypatch.setattr(mod, "BLOCK_N", 16)


def _select(q, k, kernel: bool, monkeypatch, **kw):
    taken = []
    real = moba._gate_kernel
    monkeypatch.setattr(moba, "_gate_kernel", lambda *a: taken.append(real(*a)) or taken[-1])
    with config.override(moba_gate_kernel=True, moba_gate_devices=("cuda", "cpu") if kernel else ()):
        sel = moba.select(q, k, **kw)
    assert (taken[-1] is not None) == kernel, "the kernel path was not taken as asked"
    return sel


CASES = {  # tq, tk, Hq, Hkv, block, topk, causal
    "causal_gqa2": (37, 45, 4, 2, 4, 3, True),
    "noncausal": (20, 33, 2, 2, 5, 4, False),
    "decode_tq1": (1, 50, 4, 1, 8, 3, True),
    "topk_above_blocks": (9, 12, 2, 1, 4, 8, True),  # rows with fewer candidates than topk: -1 padding
    "many_col_tiles": (40, 70, 2, 1, 1, 5, True),  # 70 blocks: 5 column tiles (3 on a GPU: 64 x 64 tiles)
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


def test_kernel_orders_by_gate_and_breaks_ties_by_index(kernel_device):
    """Raw kernel output: descending gate order, own block first; equal gates -> larger block first."""
    from attnkit import kernels

    mod = kernels.load_module("selection.gate_topk")
    q = torch.zeros(1, 1, 1, 16, device=kernel_device)
    q[..., 0] = 1.0
    means = torch.zeros(1, 1, 1, 16, 6, device=kernel_device)  # [N, Hkv, terms, D, nk]
    means[0, 0, 0, 0] = torch.tensor([0.5, 2.0, 0.5, -1.0, 3.0, 0.0])
    k_len = torch.tensor([24], device=kernel_device)
    idx = mod.gate_topk(q, means, k_len, offset=23, causal=True, block_size=4, topk=4)  # own block: 5
    assert idx.flatten().tolist() == [5, 4, 1, 2]  # gates 3.0, 2.0, then the tie 0.5 / 0.5 -> block 2


def test_kernel_is_opt_in_and_falls_back_past_max_topk(kernel_device, config_override):
    config_override(moba_gate_devices=("cuda", "cpu"))
    assert config.from_env({}).moba_gate_kernel is False
    assert moba._gate_kernel(torch.device(kernel_device), torch.float32, 4) is None  # off by default
    config_override(moba_gate_kernel=True)
    from attnkit import kernels

    mod = kernels.load_module("selection.gate_topk")
    assert moba._gate_kernel(torch.device(kernel_device), torch.float32, mod.MAX_TOPK) is mod
    assert moba._gate_kernel(torch.device(kernel_device), torch.float32, mod.MAX_TOPK + 1) is None
    assert moba._gate_kernel(torch.device(kernel_device), torch.float64, 4) is None
    config_override(moba_gate_kernel=False)
    assert moba._gate_kernel(torch.device(kernel_device), torch.float32, 4) is None


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
