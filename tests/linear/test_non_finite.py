"""Non-finite inputs stay where the recurrence puts them, in the chunked form (DESIGN.md section 7).

A NaN or inf in k or v at token t reaches that (batch, head)'s rows t' >= t and its final
state; one in q reaches only its own row. Every other row is bitwise what it is with finite input
there: the chunked form multiplies future tokens by weights that are exactly 0, and must not let
`0 * NaN` through (intra-chunk scores, the two-level state pass, varlen padding)."""

from __future__ import annotations

import pytest
import torch

from .cases import METHODS, make_inputs, run

T, P = 100, 70  # several chunks of 16 and several groups of chunks; the bad token sits in a late chunk


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("key", ["q", "k", "v"])  # non-finite gates and betas are refused by validation
@pytest.mark.parametrize("name", METHODS)
def test_a_non_finite_token_reaches_only_the_rows_after_it(name, key, bad):
    x = make_inputs(name, B=2, T=T, dtype=torch.float32)
    o0, s0 = run(name, x, chunk_size=16)
    y = dict(x)
    y[key] = x[key].clone()
    y[key][1, P, 0] = bad  # batch 1, token P, head 0
    o1, s1 = run(name, y, chunk_size=16)
    assert torch.equal(o1[0], o0[0]) and torch.equal(s1[0], s0[0]), "another sequence of the batch changed"
    assert torch.equal(o1[1, :P], o0[1, :P]), "a row before the bad token changed"
    assert torch.equal(o1[1, :, 1], o0[1, :, 1]), "another head changed"
    reached = o1[1, P:, 0] if key != "q" else o1[1, P:P + 1, 0]
    assert not torch.isfinite(reached).all(dim=-1).any(), "a row the bad token reaches must show it"
    if key == "q":
        assert torch.equal(o1[1, P + 1:], o0[1, P + 1:]) and torch.equal(s1, s0)
    else:
        assert not torch.isfinite(s1[1, 0]).all() and torch.equal(s1[1, 1], s0[1, 1])


@pytest.mark.parametrize("name", METHODS)
def test_varlen_a_non_finite_sequence_leaves_the_others_unchanged(name):
    x = make_inputs(name, B=1, T=T, dtype=torch.float32, with_state=False)
    cu = torch.tensor([0, 40, 40, T], dtype=torch.int32)  # an empty sequence in the middle
    o0, s0 = run(name, x, chunk_size=16, cu_seqlens=cu)
    y = dict(x)
    y["v"] = x["v"].clone()
    y["v"][0, 60] = float("inf")
    o1, s1 = run(name, y, chunk_size=16, cu_seqlens=cu)
    assert torch.equal(o1[:, :60], o0[:, :60]) and torch.equal(s1[:2], s0[:2])
    assert not torch.isfinite(o1[:, 60:]).all(-1).any()
