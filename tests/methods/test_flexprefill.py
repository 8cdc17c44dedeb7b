"""flexprefill (FlexPrefill): the JS-divergence pattern choice and both patterns against a loop oracle."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit as ak
from attnkit.core.contract import OptionError
from attnkit.core.oracle import naive_attention

from ._cases import cu, qkv, rows_as_sets
from .test_vertical_slash import last_attention
from .test_xattention import coverage

fp = ak.methods.flexprefill


def softmax(xs):
    mx = max(xs.values())
    z = sum(math.exp(x - mx) for x in xs.values())
    return {key: math.exp(x - mx) / z for key, x in xs.items()}


def js(p, q):
    m = {i: 0.5 * (p[i] + q[i]) for i in p}

    def kl(a):
        return sum(a[i] * math.log(a[i] / m[i]) for i in a if a[i] > 0)
    return math.sqrt(max(0.0, 0.5 * kl(p) + 0.5 * kl(q)))


def oracle(q, k, bs, gamma, tau, scale):
    """One sequence -> (rows per (head, query block), per-head sqrt-JSD)."""
    Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[0], k.shape[1]
    G, off = Hq // Hkv, Tk - Tq
    nq, nk = -(-Tq // bs), -(-Tk // bs)
    rows, dists = [], []
    for h in range(Hq):
        kh = k[:, h // G].double()
        kbar = [kh[m * bs:(m + 1) * bs].mean(0) for m in range(nk)]
        att = last_attention(q, k, h, G, bs, scale)
        reach = max(att)
        a_true = [0.0] * nk
        for probs in att.values():
            for j, x in enumerate(probs):
                a_true[j // bs] += x / len(att)
        qlast = torch.stack([q[p - off, h].double() for p in att]).mean(0)
        cand = [m for m in range(nk) if m * bs <= reach]
        est = softmax({m: float(qlast @ kbar[m]) * scale for m in cand})
        a_est = [est.get(m, 0.0) for m in range(nk)]
        dist = js(dict(enumerate(a_true)), dict(enumerate(a_est)))
        dists.append(dist)
        qa = dist < tau
        vert, slash = {}, {}
        for p, probs in att.items():
            for j, x in enumerate(probs):
                vert[j] = vert.get(j, 0.0) + x
                slash[p - j] = slash.get(p - j, 0.0) + x
        V = set(coverage(vert, [j for j in range(Tk) if j <= reach], set(), gamma))
        Dg = set(coverage(slash, [d for d in range(Tk) if d <= reach], set(), gamma))
        for n in range(nq):
            first, last = n * bs + off, min((n + 1) * bs, Tq) - 1 + off
            cand = [m for m in range(nk) if m * bs <= last]
            forced = {m for m in cand if m == 0 or first // bs <= m <= last // bs}
            if qa:
                qbar = q[n * bs:min((n + 1) * bs, Tq), h].double().mean(0)
                mass = softmax({m: float(qbar @ kbar[m]) * scale for m in cand})
                rows.append(coverage(mass, cand, forced, gamma))
            else:
                blocks = set(forced)
                for p in range(first, last + 1):
                    blocks |= {j // bs for j in V if j <= p}
                    blocks |= {(p - d) // bs for d in Dg if p - d >= 0}
                rows.append(sorted(blocks))
    return rows, dists


@pytest.mark.parametrize("bs,gamma,tau", [(4, 0.8, 0.0), (4, 0.8, 1.0), (3, 0.6, 0.25), (5, 0.95, 0.15)])
@pytest.mark.parametrize("tq,tk,hq,hkv", [(22, 22, 4, 1), (13, 19, 4, 2)])
def test_selection_matches_definition(bs, gamma, tau, tq, tk, hq, hkv):
    q, k, _ = qkv(1, tq, tk, hq, hkv, D=4, dtype=torch.float64, seed=tq + 7 * bs)
    sel = fp.select(q, k, block_size=bs, gamma=gamma, tau=tau)
    want, dists = oracle(q[0], k[0], bs, gamma, tau, 0.5)
    assert tau != 1.0 or max(dists) < 1.0, "tau = 1 should send every head to the query-aware pattern"
    assert rows_as_sets(sel.indices) == want, "FlexPrefill rows differ from the definition"


def test_mixed_heads_pick_both_patterns():
    """tau between the heads' divergences: some heads go query-aware, the others vertical-slash."""
    q, k, _ = qkv(1, 40, 40, 8, 2, D=4, dtype=torch.float64, seed=3)
    _, dists = oracle(q[0], k[0], 4, 0.9, 1.0, 0.5)
    tau = sorted(dists)[len(dists) // 2]
    assert min(dists) < tau <= max(dists), f"heads' divergences too close to split: {dists}"
    want, _ = oracle(q[0], k[0], 4, 0.9, tau, 0.5)
    assert rows_as_sets(fp.select(q, k, block_size=4, gamma=0.9, tau=tau).indices) == want


def test_varlen_equals_per_sequence():
    lengths = [10, 3, 15]
    q, k, _ = qkv(1, sum(lengths), sum(lengths), 2, 1, D=4, dtype=torch.float64, seed=8)
    for tau in (0.0, 1.0):
        sel = fp.select(q, k, block_size=4, gamma=0.8, tau=tau, cu_seqlens=cu(lengths))
        start = 0
        for n, L in enumerate(lengths):
            want, _ = oracle(q[0, start:start + L], k[0, start:start + L], 4, 0.8, tau, 0.5)
            assert rows_as_sets(sel.indices[n:n + 1, :, : -(-L // 4)]) == want, f"sequence {n} differs (tau={tau})"
            start += L


def test_full_gamma_equals_dense():
    q, k, v = qkv(1, 21, 21, 4, 2, D=8, dtype=torch.float64, seed=4)
    for tau in (0.0, 1.0):
        out = ak.attention(q, k, v, method="flexprefill", block_size=4, gamma=1.0, tau=tau)
        ref, _ = naive_attention(q, k, v, causal=True)
        assert (out - ref).abs().max() < 1e-10, f"gamma 1 must equal dense attention (tau={tau})"


@pytest.mark.parametrize("bad, field", [({"gamma": 0.0}, "gamma"), ({"tau": -0.1}, "tau"), ({"block_size": 0}, "block_size")])
def test_invalid_options_raise(bad, field):
    q, k, v = qkv(1, 8, 8, 2, 2)
    with pytest.raises(OptionError, match=rf"^{field}: expected"):
        ak.attention(q, k, v, method="flexprefill", **{"block_size": 4, **bad})


def test_decode_is_dense():
    q, k, v = qkv(1, 1, 30, 2, 1, D=8, dtype=torch.float64, seed=6)
    out = ak.attention(q, k, v, method="flexprefill", block_size=4, gamma=0.1)
    ref, _ = naive_attention(q, k, v, causal=True)
    assert (out - ref).abs().max() < 1e-10, "a decode step must attend to the whole cache"
