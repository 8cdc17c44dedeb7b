"""Block top-k: pooled block scores, top-k plus sink and local blocks (definition, independent of the executor)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit as ak
from attnkit.core.contract import OptionError

from ._cases import qkv, rows_as_sets

block_topk = ak.methods.block_topk


def brute_force(q, k, block, topk, sinks, local, causal):
    B, Tq, Hq, _ = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    nq, nk, off = -(-Tq // block), -(-Tk // block), Tk - Tq
    rows = []
    for b in range(B):
        for h in range(Hq):
            kh = k[b, :, h // (Hq // Hkv)].double()
            km = [kh[m * block : (m + 1) * block].mean(0) for m in range(nk)]
            for n in range(nq):
                qm = q[b, n * block : (n + 1) * block, h].double().mean(0)
                first, last = n * block + off, min((n + 1) * block, Tq) - 1 + off
                cand = [m for m in range(nk) if not causal or m * block <= last]
                forced = {m for m in cand if m < sinks}
                if local:
                    forced |= {m for m in cand if first // block - (local - 1) <= m <= last // block}
                rest = sorted((m for m in cand if m not in forced), key=lambda m: -float(qm @ km[m]))[:topk]
                rows.append(sorted(forced | set(rest)))
    return rows


@settings(max_examples=15)
@given(tq=st.integers(1, 20), extra=st.integers(0, 9), block=st.integers(1, 6), topk=st.integers(1, 4),
       sinks=st.integers(0, 2), local=st.integers(0, 2), causal=st.booleans())
def test_selection_matches_definition(tq, extra, block, topk, sinks, local, causal):
    q, k, _ = qkv(1, tq, tq + extra, 4, 2, D=4, dtype=torch.float64, seed=3 * tq + extra)
    sel = block_topk.select(q, k, block_size=block, topk=topk, sinks=sinks, local=local, causal=causal)
    assert sel.q_block == sel.k_block == block and sel.num_heads == 4
    assert rows_as_sets(sel.indices) == brute_force(q, k, block, topk, sinks, local, causal), "block top-k rows differ"


def test_keeps_sinks_and_local_blocks():
    T, block = 64, 4
    q, k, _ = qkv(1, T, T, 2, 2)
    idx = block_topk.select(q, k, block_size=block, topk=1, sinks=2, local=2).indices  # [1, 2, 16, S]
    n = torch.arange(T // block).view(1, 1, -1, 1)
    for blk, name in ((torch.zeros_like(n), "sink 0"), (torch.ones_like(n).minimum(n), "sink 1"), (n, "diagonal"),
                      ((n - 1).clamp_min(0), "previous local")):
        assert bool((idx == blk).any(-1).all()), f"block top-k lost the {name} block for some query block"
    counts = (idx >= 0).sum(-1)
    assert int(counts.max()) <= 2 + 2 + 1, f"at most sinks + local + topk blocks, got {int(counts.max())}"


@pytest.mark.parametrize("bad, field", [({"topk": 0}, "topk"), ({"block_size": 0}, "block_size"),
                                        ({"sinks": -1}, "sinks"), ({"local": -1}, "local"), ({"local": 1.0}, "local")])
def test_invalid_options_raise(bad, field):
    q, k, v = qkv(1, 8, 8, 2, 2)
    with pytest.raises(OptionError, match=rf"^{field}: expected"):
        ak.attention(q, k, v, method="block_topk", **{"block_size": 4, "topk": 2, **bad})
