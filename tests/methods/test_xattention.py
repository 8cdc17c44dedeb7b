"""xattention (XAttention): antidiagonal block scores and threshold selection against a loop oracle."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit as ak
from attnkit.core.contract import OptionError
from attnkit.core.oracle import naive_attention

from ._cases import cu, qkv, rows_as_sets

xa = ak.methods.xattention


def coverage(scores, candidates, forced, threshold):
    """Forced first, then by descending score while the kept score is below threshold * total."""
    total = sum(scores[m] for m in candidates)
    kept = {m for m in candidates if m in forced}
    acc = sum(scores[m] for m in kept)
    for m in sorted((m for m in candidates if m not in kept), key=lambda m: -scores[m]):
        if acc >= threshold * total:
            break
        kept.add(m)
        acc += scores[m]
    return sorted(kept)


def oracle(q, k, bs, S, threshold, causal, scale):
    """One sequence: q [Tq, Hq, D], k [Tk, Hkv, D] -> rows per (head, query block)."""
    Tq, Hq, _ = q.shape
    Tk, Hkv = k.shape[0], k.shape[1]
    G, off = Hq // Hkv, Tk - Tq
    nq, nk = -(-Tq // bs), -(-Tk // bs)
    n_rs, n_cs = nq * bs // S, nk * bs // S
    rows = []
    for h in range(Hq):
        def qrow(i):
            return q[i, h].double() if i < Tq else torch.zeros_like(q[0, h].double())

        def krow(j):
            return k[j, h // G].double() if j < Tk else torch.zeros_like(k[0, 0].double())

        block = [[0.0] * nk for _ in range(nq)]
        for r in range(n_rs):
            if r * S >= Tq:
                continue
            vis = [c for c in range(n_cs) if c * S < Tk and (not causal or c * S <= off + r * S + S - 1)]
            logit = {c: sum(float(qrow(r * S + S - 1 - s) @ krow(c * S + s)) for s in range(S)) * scale / S for c in vis}
            mx = max(logit.values())
            z = sum(math.exp(x - mx) for x in logit.values())
            for c in vis:
                block[r * S // bs][c * S // bs] += math.exp(logit[c] - mx) / z
        for n in range(nq):
            first, last = n * bs + off, min((n + 1) * bs, Tq) - 1 + off
            cand = [m for m in range(nk) if m * bs < Tk and (not causal or m * bs <= last)]
            forced = {m for m in cand if m == 0 or first // bs <= m <= last // bs}
            rows.append(coverage(dict(enumerate(block[n])), cand, forced, threshold))
    return rows


@pytest.mark.parametrize("bs,S,thr", [(4, 2, 0.8), (6, 3, 0.5), (4, 4, 0.95), (2, 1, 0.7)])
@pytest.mark.parametrize("tq,tk,hq,hkv,causal", [(22, 22, 2, 1, True), (13, 19, 4, 2, True), (10, 10, 2, 2, False)])
def test_selection_matches_definition(bs, S, thr, tq, tk, hq, hkv, causal):
    q, k, _ = qkv(1, tq, tk, hq, hkv, D=4, dtype=torch.float64, seed=tq * bs + S)
    sel = xa.select(q, k, block_size=bs, stride=S, threshold=thr, causal=causal)
    assert sel.q_block == sel.k_block == bs and sel.num_heads == hq
    assert rows_as_sets(sel.indices) == oracle(q[0], k[0], bs, S, thr, causal, 0.5), "XAttention rows differ"


def test_varlen_equals_per_sequence():
    lengths = [11, 4, 17]
    q, k, _ = qkv(1, sum(lengths), sum(lengths), 2, 1, D=4, dtype=torch.float64, seed=9)
    sel = xa.select(q, k, block_size=4, stride=2, threshold=0.7, cu_seqlens=cu(lengths))
    start = 0
    for n, L in enumerate(lengths):
        want = oracle(q[0, start:start + L], k[0, start:start + L], 4, 2, 0.7, True, 0.5)
        assert rows_as_sets(sel.indices[n:n + 1, :, : -(-L // 4)]) == want, f"sequence {n} differs"
        start += L


def test_forced_blocks_and_causality():
    q, k, _ = qkv(1, 64, 64, 2, 1, D=8, seed=1)
    idx = xa.select(q, k, block_size=8, stride=4, threshold=0.1).indices  # [1, 2, 8, S]
    n = torch.arange(8).view(1, 1, -1, 1)
    assert bool((idx == 0).any(-1).all()) and bool((idx == n).any(-1).all()), "first or diagonal block missing"
    assert bool(((idx <= n) | (idx < 0)).all()), "a future key block was selected"


@pytest.mark.parametrize("tq,tk", [(21, 21), (13, 21), (21, 13)])
def test_full_threshold_equals_dense(tq, tk):
    q, k, v = qkv(1, tq, tk, 4, 2, D=8, dtype=torch.float64, seed=4)
    for causal in (True, False):
        out = ak.attention(q, k, v, method="xattention", block_size=4, stride=2, threshold=1.0, causal=causal)
        ref, _ = naive_attention(q, k, v, causal=causal)
        assert (out - ref).abs().max() < 1e-10, f"threshold 1 must equal dense attention (causal={causal})"


def test_decode_is_dense():
    q, k, v = qkv(1, 1, 30, 2, 1, D=8, dtype=torch.float64, seed=6)
    out = ak.attention(q, k, v, method="xattention", block_size=4, stride=2, threshold=0.1)
    ref, _ = naive_attention(q, k, v, causal=True)
    assert (out - ref).abs().max() < 1e-10


@pytest.mark.parametrize("bad, field", [({"stride": 3}, "stride"), ({"block_size": 0}, "block_size"),
                                        ({"threshold": 0.0}, "threshold"), ({"threshold": 1.5}, "threshold")])
def test_invalid_options_raise(bad, field):
    q, k, v = qkv(1, 8, 8, 2, 2)
    with pytest.raises(OptionError, match=rf"^{field}: expected"):
        ak.attention(q, k, v, method="xattention", **{"block_size": 4, "stride": 2, **bad})
