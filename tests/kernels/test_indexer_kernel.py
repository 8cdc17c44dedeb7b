"""The fused DSA indexer-score kernel (`kernels/selection/indexer.py`) against the PyTorch tiles and the
definition; on a GPU when there is one, else in Triton's CPU interpreter at tiny shapes."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit import config, kernels
from attnkit.core.contract import validate_attention
from attnkit.methods import dsa
from attnkit.methods.router import seq_view

from ..methods._cases import indexer_inputs, qkv
from ..methods.test_dsa import check_topk_rows, indexer_scores


def _tiles(kernel_device, tq, tk, causal, dtype, cu=None, hi=3, di=24, seed=0):
    ind = {k: v.to(kernel_device) for k, v in indexer_inputs(1 if cu is not None else 2, tq, tk, hi=hi, di=di,
                                                             dtype=dtype, seed=seed).items()}
    ind["w"] = ind["w"].float()
    q, k, _ = qkv(ind["q_idx"].shape[0], tq, tk, 2, 1, D=8, dtype=dtype)
    call = validate_attention(q.to(kernel_device), k.to(kernel_device), k.to(kernel_device), causal=causal,
                              cu_seqlens=cu)
    view = seq_view(call)
    return ind, view


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tq,tk,rows,cols", [(70, 70, (0, 70), (0, 70)), (37, 150, (5, 37), (17, 150)),
                                             (130, 130, (64, 130), (0, 129))])
def test_kernel_tile_equals_pytorch_tile(kernel_device, causal, dtype, tq, tk, rows, cols):
    ind, view = _tiles(kernel_device, tq, tk, causal, dtype)
    with config.override(dsa_indexer_devices=()):
        torch_tiles = dsa._Indexer(view, **ind)
    assert torch_tiles.kernel is None
    with config.override(dsa_indexer_devices=("cuda", "cpu")):
        fused = dsa._Indexer(view, **ind)
    assert fused.kernel is not None, "the kernel path was not taken"
    r, c = slice(*rows), slice(*cols)
    want, got = torch_tiles(r, c), fused(r, c)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "masks differ"
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)


def test_kernel_tile_varlen_masks_each_sequence(kernel_device):
    cu = torch.tensor([0, 50, 77, 140], dtype=torch.int32, device=kernel_device)
    ind, view = _tiles(kernel_device, 140, 140, True, torch.float32, cu=cu)
    with config.override(dsa_indexer_devices=()):
        want = dsa._Indexer(view, **ind)(slice(0, view.tq), slice(0, view.tk))
    with config.override(dsa_indexer_devices=("cuda", "cpu")):
        got = dsa._Indexer(view, **ind)(slice(0, view.tq), slice(0, view.tk))
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_selection_through_the_kernel_is_the_top_k(kernel_device, config_override, causal):
    config_override(dsa_indexer_devices=("cuda", "cpu"))
    tq, tk, topk = 45, 75, 11
    q, k, _ = qkv(2, tq, tk, 2, 1, D=8, dtype=torch.float32)
    ind = indexer_inputs(2, tq, tk, hi=3, di=16, dtype=torch.float32, seed=5)
    sel = dsa.select(q.to(kernel_device), k.to(kernel_device), topk=topk, causal=causal,
                     **{n: t.to(kernel_device) for n, t in ind.items()})
    i = torch.arange(tq).view(1, -1, 1) + tk - tq
    visible = (torch.arange(tk).view(1, 1, -1) <= i) if causal else torch.ones(1, tq, tk, dtype=torch.bool)
    scores = indexer_scores(**{n: t.double() for n, t in ind.items()})
    # float32 scores: ties within rounding are allowed, so compare values with a tolerance
    s = scores.masked_fill(~visible.expand(2, -1, -1), float("-inf"))
    for b in range(2):
        for r in range(tq):
            got = sorted(x for x in sel.indices[b, 0, r].cpu().tolist() if x >= 0)
            n = min(topk, int(visible[0, r].sum()))
            assert len(got) == n == len(set(got))
            want_v = s[b, r].topk(n).values
            got_v = s[b, r, got].sort(descending=True).values
            torch.testing.assert_close(got_v, want_v, rtol=1e-5, atol=1e-5)
