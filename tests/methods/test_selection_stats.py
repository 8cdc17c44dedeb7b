"""Density and attention-mass recall of selections, against dense brute force."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak

from ._cases import SELECTION_METHODS, cu, options, qkv, select

inspect = ak.methods.selection_stats


def dense_density(sel, hq, hkv, tq, tk, causal):
    mask = sel.to_dense_mask(hq, hkv, tq, tk)
    c = (torch.arange(tk).view(1, -1) <= torch.arange(tq).view(-1, 1) + tk - tq) if causal else torch.ones(tq, tk, dtype=torch.bool)
    return float((mask & c).sum()) / float(c.sum() * mask.shape[0] * mask.shape[1])


@pytest.mark.parametrize("method", SELECTION_METHODS)
@pytest.mark.parametrize("tq, tk", [(29, 29), (3, 40)])
@pytest.mark.parametrize("causal", [True, False])
def test_density_equals_dense_count(method, tq, tk, causal):
    q, k, _ = qkv(2, tq, tk, 4, 2)
    sel = select(method, q, k, options(method, 2, tq, tk, torch.float32, block_size=4, topk=2), causal=causal)
    got = inspect.density(sel, tq, tk, causal=causal)
    want = dense_density(sel, 4, 2, tq, tk, causal)
    assert abs(got - want) < 1e-12, f"{method}: density {got:.6f} != dense count {want:.6f}"


def test_density_varlen_counts_each_sequence():
    lengths = [7, 12]
    q, k, _ = qkv(1, 19, 19, 2, 2)
    sel = ak.methods.moba.select(q, k, block_size=3, topk=2, cu_seqlens=cu(lengths))
    visited = pairs = 0.0
    start = 0
    for n, L in enumerate(lengths):
        one = ak.methods.moba.select(q[:, start : start + L], k[:, start : start + L], block_size=3, topk=2)
        d = dense_density(one, 2, 2, L, L, True)
        visited += d * L * (L + 1) / 2
        pairs += L * (L + 1) / 2
        start += L
    got = inspect.density(sel, 19, 19, cu_seqlens=cu(lengths))
    assert abs(got - visited / pairs) < 1e-12, f"varlen density {got:.6f} != {visited / pairs:.6f}"


@pytest.mark.parametrize("causal", [True, False])
def test_recall_equals_dense_probability_mass(causal):
    q, k, _ = qkv(1, 21, 25, 4, 2, dtype=torch.float64)
    sel = ak.methods.moba.select(q, k, block_size=4, topk=2, causal=causal)
    got = inspect.recall(q, k, sel, causal=causal, reduce=False)  # [B, Hq, Tq]
    s = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(2, 2)) * 8 ** -0.5
    c = torch.arange(25).view(1, -1) <= torch.arange(21).view(-1, 1) + 4
    if causal:
        s = s.masked_fill(~c, float("-inf"))
    p = torch.softmax(s, -1)
    mask = sel.to_dense_mask(4, 2, 21, 25)
    want = (p * mask).sum(-1)
    err = (got - want).abs().max().item()
    assert err < 1e-12, f"recall differs from the dense probability mass by {err:.3e}"
    assert abs(inspect.recall(q, k, sel, causal=causal) - want.mean().item()) < 1e-12


def test_report_dense_selection_has_full_recall_and_density():
    q, k, _ = qkv(1, 16, 16, 2, 2, dtype=torch.float64)
    sel = ak.methods.moba.select(q, k, block_size=4, topk=4)
    r = inspect.report(q, k, sel)
    assert abs(r["density"] - 1.0) < 1e-12 and abs(r["recall"] - 1.0) < 1e-12, f"dense selection: {r}"
    assert r["width"] == 4 and r["k_block"] == 4 and r["q_block"] == 1
    sparse = inspect.report(q, k, ak.methods.moba.select(q, k, block_size=4, topk=1))
    assert sparse["density"] < 1.0 and sparse["recall"] < 1.0, f"own block only should miss mass: {sparse}"


def test_bad_selection_raises():
    with pytest.raises(ak.AttnkitError, match="^selection: expected"):
        inspect.density("not a selection", 4, 4)
    q, k, _ = qkv(1, 8, 8, 2, 2)
    with pytest.raises(ak.AttnkitError, match="^selection.indices"):
        inspect.recall(q, k, ak.KVSelection(torch.zeros(1, 1, 3, 1, dtype=torch.int32), 1, 1))
