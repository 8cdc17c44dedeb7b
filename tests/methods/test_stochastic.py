"""Stochastic Attention: a seeded permutation, a window in permuted order, causal in the original order."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit as ak
from attnkit.core.contract import OptionError

from ._cases import qkv

stochastic = ak.methods.stochastic


@settings(max_examples=20)
@given(tq=st.integers(1, 30), extra=st.integers(0, 10), window=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_selection_is_a_window_in_the_permuted_order(tq, extra, window, seed):
    tk = tq + extra
    q, k, _ = qkv(1, tq, tk, 2, 1, D=2)
    perm, rank = stochastic.permutation(seed, torch.tensor([tk]), tk)
    assert sorted(perm[0].tolist()) == list(range(tk)), "not a permutation"
    assert torch.equal(perm[0][rank[0]], torch.arange(tk)), "rank is not the inverse permutation"
    sel = stochastic.select(q, k, window=window, seed=seed)
    for i in range(tq):
        p = i + tk - tq
        got = sorted(x for x in sel.indices[0, 0, i].tolist() if x >= 0)
        want = sorted(j for j in range(tk) if abs(int(rank[0, p]) - int(rank[0, j])) < window)
        assert got == want, f"query {i}: keys {got}, expected the permuted window {want}"


def test_seed_changes_the_permutation_and_prefixes_are_consistent():
    p0, _ = stochastic.permutation(0, torch.tensor([50]), 50)
    p1, _ = stochastic.permutation(1, torch.tensor([50]), 50)
    assert not torch.equal(p0, p1), "different seeds (layers) gave the same permutation"
    short, _ = stochastic.permutation(0, torch.tensor([20]), 20)
    assert short[0].tolist() == [t for t in p0[0].tolist() if t < 20], "length-20 order is not a prefix restriction"


def test_density_equals_the_window_count():
    T, window = 400, 8
    q, k, v = qkv(1, T, T, 1, 1, D=2)
    sel = stochastic.select(q, k, window=window)
    assert sel.width == 2 * window - 1
    d = ak.methods.inspect.density(sel, T, T, causal=False)
    # rank r sees the ranks [r - w + 1, r + w - 1] clipped to [0, T)
    want = sum(min(r + window, T) - max(r - window + 1, 0) for r in range(T)) / T**2
    assert abs(d - want) < 1e-12, f"non-causal density {d:.6f}, expected {want:.6f}"
    causal = ak.methods.inspect.density(sel, T, T, causal=True)
    assert 0.5 * want < causal < 1.5 * want, f"causal density {causal:.5f} far from about {want:.5f}"


@pytest.mark.parametrize("bad, field", [({"window": 0}, "window"), ({"seed": -1}, "seed"), ({"seed": "a"}, "seed"),
                                        ({"seed": 2**32}, "seed")])  # the hash is 32-bit: no silent repeat
def test_invalid_options_raise(bad, field):
    q, k, v = qkv(1, 8, 8, 2, 2)
    with pytest.raises(OptionError, match=rf"^{field}: expected"):
        ak.attention(q, k, v, method="stochastic", **{"window": 2, **bad})
