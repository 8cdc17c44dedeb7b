"""hip (HiP Attention): the hierarchical range search against a loop oracle of its definition."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.core.contract import OptionError
from attnkit.core.oracle import naive_attention

from ._cases import cu, qkv, rows_as_sets

hip = ak.methods.hip


def oracle(q, k, bs, topk, sinks, local, causal, scale):
    Tq, Hq, _ = q.shape
    Tk, Hkv = k.shape[0], k.shape[1]
    G, off = Hq // Hkv, Tk - Tq
    nq, nk = -(-Tq // bs), -(-Tk // bs)
    rows = []
    for h in range(Hq):
        for n in range(nq):
            qs = q[n * bs:min((n + 1) * bs, Tq), h].double()
            first, last = n * bs + off, min((n + 1) * bs, Tq) - 1 + off
            V = min(nk, last // bs + 1) if causal else nk

            def score(r):
                s, e = r
                t = (s * bs + min(e * bs, Tk) - 1) // 2
                return float((qs @ k[t, h // G].double()).max()) * scale

            ranges = [(i * V // (2 * topk), (i + 1) * V // (2 * topk)) for i in range(2 * topk)]
            ranges = [r for r in ranges if r[1] > r[0]]
            while True:
                ranges = sorted(ranges, key=lambda r: -score(r))[:topk]
                if all(e - s == 1 for s, e in ranges):
                    break
                split = []
                for s, e in ranges:
                    mid = s + (e - s + 1) // 2
                    split += [(s, mid)] + ([(mid, e)] if e > mid else [])
                ranges = split
            kept = {s for s, _ in ranges}
            kept |= {m for m in range(min(sinks, V))}
            if local:
                kept |= {m for m in range(max(0, first // bs - (local - 1)), min(V, last // bs + 1))}
            rows.append(sorted(kept))
    return rows


@pytest.mark.parametrize("bs,topk,sinks,local", [(2, 2, 1, 1), (3, 1, 0, 0), (2, 3, 0, 2), (4, 2, 2, 1)])
@pytest.mark.parametrize("tq,tk,hq,hkv,causal", [(37, 37, 2, 1, True), (20, 29, 4, 2, True), (26, 26, 2, 2, False)])
def test_selection_matches_definition(bs, topk, sinks, local, tq, tk, hq, hkv, causal):
    q, k, _ = qkv(1, tq, tk, hq, hkv, D=4, dtype=torch.float64, seed=tq + bs * topk)
    sel = hip.select(q, k, block_size=bs, topk=topk, sinks=sinks, local=local, causal=causal)
    assert sel.q_block == sel.k_block == bs and sel.num_heads == hq
    assert rows_as_sets(sel.indices) == oracle(q[0], k[0], bs, topk, sinks, local, causal, 0.5), "HiP rows differ"
    assert int((sel.indices >= 0).sum(-1).max()) <= topk + sinks + local + 1, "budget exceeded"


def test_varlen_equals_per_sequence():
    lengths = [13, 5, 22]
    q, k, _ = qkv(1, sum(lengths), sum(lengths), 2, 1, D=4, dtype=torch.float64, seed=2)
    sel = hip.select(q, k, block_size=2, topk=2, sinks=1, local=1, cu_seqlens=cu(lengths))
    start = 0
    for n, L in enumerate(lengths):
        want = oracle(q[0, start:start + L], k[0, start:start + L], 2, 2, 1, 1, True, 0.5)
        assert rows_as_sets(sel.indices[n:n + 1, :, : -(-L // 2)]) == want, f"sequence {n} differs"
        start += L


def test_topk_covering_everything_equals_dense():
    q, k, v = qkv(1, 21, 21, 4, 2, D=8, dtype=torch.float64, seed=4)
    for causal in (True, False):
        out = ak.attention(q, k, v, method="hip", block_size=4, topk=6, sinks=0, local=0, causal=causal)
        ref, _ = naive_attention(q, k, v, causal=causal)
        assert (out - ref).abs().max() < 1e-10, f"topk >= blocks must equal dense attention (causal={causal})"


def test_finds_planted_block():
    """A wide span of keys that match every query (HiP's attention locality) draws the search into it."""
    q, k, _ = qkv(1, 256, 256, 1, 1, D=8, seed=0)
    q = q.abs() * 0.1
    k = k * 0.1
    k[0, 40:140] = 3.0
    idx = hip.select(q, k, block_size=8, topk=1, sinks=0, local=0).indices[0, 0, -10:]  # [10, 1]
    assert bool(((idx >= 40 // 8) & (idx < 140 // 8)).all()), f"the search left the planted span: {idx.flatten().tolist()}"


@pytest.mark.parametrize("bad, field", [({"topk": 0}, "topk"), ({"block_size": 0}, "block_size"), ({"sinks": -1}, "sinks")])
def test_invalid_options_raise(bad, field):
    q, k, v = qkv(1, 8, 8, 2, 2)
    with pytest.raises(OptionError, match=rf"^{field}: expected"):
        ak.attention(q, k, v, method="hip", **{"block_size": 4, **bad})


def test_decode_is_dense():
    q, k, v = qkv(1, 1, 30, 2, 1, D=8, dtype=torch.float64, seed=6)
    out = ak.attention(q, k, v, method="hip", block_size=4, topk=1, sinks=0, local=0)
    ref, _ = naive_attention(q, k, v, causal=True)
    assert (out - ref).abs().max() < 1e-10, "a decode step must attend to the whole cache"
