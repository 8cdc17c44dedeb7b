"""The shared estimation helpers of the prefill methods against brute force: the diagonal sums,
the coverage rule and the key blocks touched by selected columns and diagonals."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.core.contract import validate_attention
from attnkit.methods._prefill_estimate import coverage_keep, slash_sums, vertical_slash_rows
from attnkit.methods.router import seq_view

from ._cases import rows_as_sets


@settings(max_examples=25, deadline=None)
@given(tq=st.integers(1, 20), extra=st.integers(0, 12), block=st.integers(1, 6), seed=st.integers(0, 10_000),
       p_col=st.floats(0.0, 0.5), p_diag=st.floats(0.0, 0.5))
def test_vertical_slash_rows_match_token_union(tq, extra, block, seed, p_col, p_diag):
    tk = tq + extra
    g = torch.Generator().manual_seed(seed)
    cols = torch.rand(1, 2, tk, generator=g) < p_col
    diags = torch.rand(1, 2, tk, generator=g) < p_diag
    q = torch.zeros(1, tq, 2, 1)
    view = seq_view(validate_attention(q, torch.zeros(1, tk, 2, 1), torch.zeros(1, tk, 2, 1)))
    got = rows_as_sets(vertical_slash_rows(view, cols, diags, block, width=tk))
    off, want = tk - tq, []
    for h in range(2):
        V = [j for j in range(tk) if cols[0, h, j]]
        D = [d for d in range(tk) if diags[0, h, d]]
        for n in range(-(-tq // block)):
            blocks = set()
            for i in range(n * block, min((n + 1) * block, tq)):
                p = i + off
                blocks |= {j // block for j in V if j <= p} | {(p - d) // block for d in D if p - d >= 0}
            want.append(sorted(blocks))
    assert got == want


@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 6), extra=st.integers(0, 10), seed=st.integers(0, 10_000))
def test_slash_sums_are_diagonal_sums(L, extra, seed):
    tk = L + extra
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(2, 3, L, tk, generator=g, dtype=torch.float64)
    pos = (tk - L + torch.arange(L)).view(1, L).expand(2, L)
    got = slash_sums(probs, pos)
    want = torch.zeros(2, 3, tk, dtype=torch.float64)
    for i in range(L):
        for j in range(tk):
            d = int(pos[0, i]) - j
            if 0 <= d < tk:
                want[:, :, d] += probs[:, :, i, j]
    assert torch.allclose(got, want)


@settings(max_examples=40, deadline=None)
@given(C=st.integers(1, 12), thr=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_coverage_keep_is_the_smallest_covering_set(C, thr, seed):
    g = torch.Generator().manual_seed(seed)
    mass = torch.rand(C, generator=g, dtype=torch.float64)
    cand = torch.rand(C, generator=g) < 0.8
    forced = torch.rand(C, generator=g) < 0.2
    got = coverage_keep(mass, cand, forced, thr)
    keep = {i for i in range(C) if cand[i] and forced[i]}
    total = float(mass[cand].sum())
    acc = sum(float(mass[i]) for i in keep)
    for i in sorted((i for i in range(C) if cand[i] and i not in keep), key=lambda i: -float(mass[i])):
        if acc >= thr * total:
            break
        keep.add(i)
        acc += float(mass[i])
    assert {i for i in range(C) if got[i]} == keep
