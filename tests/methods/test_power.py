"""PowerAttention's block pattern against its definition."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit as ak
from attnkit.core.contract import OptionError

from ._cases import qkv

power = ak.methods.power


def is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@settings(max_examples=20)
@given(tq=st.integers(1, 40), extra=st.integers(-20, 20), block=st.integers(1, 5), sinks=st.integers(0, 3),
       causal=st.booleans())
def test_token_visibility_matches_definition(tq, extra, block, sinks, causal):
    # one alignment for every pattern: query i sits at key position i + Tk - Tq, negative when Tq > Tk
    tk = max(1, tq + extra)
    q, k, _ = qkv(1, tq, tk, 2, 1, D=2)
    sel = power.select(q, k, block_size=block, sinks=sinks, causal=causal)
    vis = sel.to_dense_mask(2, 1, tq, tk)[0, 0]  # [Tq, Tk] blocks visible to each query (tests only)
    for i in range(tq):
        n = (i + tk - tq) // block
        for j in range(tk):
            m = j // block
            d = n - m if causal else abs(n - m)
            want = m == n or is_power_of_two(d) or m < sinks
            assert bool(vis[i, j]) == want, f"query {i} (block {n}) key {j} (block {m}): got {bool(vis[i, j])}"


def test_blocks_per_row_grow_logarithmically():
    T, block = 256, 4
    q, k, _ = qkv(1, T, T, 1, 1, D=2)
    sel = power.select(q, k, block_size=block)
    counts = (sel.indices >= 0).sum(-1).flatten()
    assert int(counts.max()) == 1 + 6, f"64 blocks: own + 6 powers of two (1..32), got {int(counts.max())}"
    assert sel.q_block == block, "aligned queries should use block rows"


@pytest.mark.parametrize("bad, field", [({"block_size": 0}, "block_size"), ({"sinks": -1}, "sinks")])
def test_invalid_options_raise(bad, field):
    q, k, v = qkv(1, 8, 8, 2, 2)
    with pytest.raises(OptionError, match=rf"^{field}: expected"):
        ak.attention(q, k, v, method="power", **{"block_size": 4, **bad})


def test_tq_above_tk_non_causal_uses_the_aligned_distance():
    q, k, _ = qkv(1, 4, 1, 1, 1, D=2)
    vis = power.select(q, k, block_size=1, causal=False).to_dense_mask(1, 1, 4, 1)[0, 0, :, 0]
    assert vis.tolist() == [False, True, True, True]  # aligned positions -3, -2, -1, 0: distances 3, 2, 1, 0
