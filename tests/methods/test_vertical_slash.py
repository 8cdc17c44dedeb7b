"""vertical_slash (MInference): the selection against a loop-based oracle of its definition."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.core.contract import OptionError
from attnkit.core.oracle import naive_attention

from ._cases import cu, qkv, rows_as_sets

vs = ak.methods.vertical_slash


def last_attention(q, k, h, G, L, scale):
    """Rows {position: probs over keys} of the last L queries of one sequence, by loops (float64)."""
    Tq, Tk = q.shape[0], k.shape[0]
    off = Tk - Tq
    out = {}
    for i in range(max(0, Tq - L), Tq):
        p = i + off
        logits = [float(q[i, h].double() @ k[j, h // G].double()) * scale for j in range(p + 1)]
        mx = max(logits)
        e = [pow(2.718281828459045, x - mx) for x in logits]
        z = sum(e)
        out[p] = [x / z for x in e]
    return out


def pick(scores, n_keep, n_forced):
    forced = [c for c in sorted(scores) if c < n_forced]
    rest = sorted((c for c in scores if c >= n_forced), key=lambda c: -scores[c])
    return set((forced + rest)[:n_keep])


def oracle(q, k, o, scale):
    """Per (head, query block): sorted key blocks, for one sequence q [Tq, Hq, D], k [Tk, Hkv, D]."""
    Tq, Hq, _ = q.shape
    Tk, Hkv = k.shape[0], k.shape[1]
    G, off, bs = Hq // Hkv, Tk - Tq, o["block_size"]
    rows = []
    for h in range(Hq):
        att = last_attention(q, k, h, G, o["n_last"], scale)
        vert, slash = {}, {}
        for p, probs in att.items():
            for j, x in enumerate(probs):
                vert[j] = vert.get(j, 0.0) + x
                slash[p - j] = slash.get(p - j, 0.0) + x
        V = pick(vert, o["n_vertical"], o["sinks"])
        D = pick(slash, o["n_slash"], o["window"])
        for n in range(-(-Tq // bs)):
            blocks = set()
            for i in range(n * bs, min((n + 1) * bs, Tq)):
                p = i + off
                blocks |= {j // bs for j in V if j <= p}
                blocks |= {(p - d) // bs for d in D if p - d >= 0}
            rows.append(sorted(blocks))
    return rows


OPTS = [dict(block_size=4, n_vertical=3, n_slash=2, n_last=5, sinks=1, window=1),
        dict(block_size=3, n_vertical=1, n_slash=4, n_last=2, sinks=0, window=0),
        dict(block_size=5, n_vertical=6, n_slash=3, n_last=16, sinks=2, window=2)]


@pytest.mark.parametrize("o", OPTS)
@pytest.mark.parametrize("tq,tk,hq,hkv", [(21, 21, 2, 1), (13, 19, 4, 2), (1 + 16, 17, 2, 2)])
def test_selection_matches_definition(o, tq, tk, hq, hkv):
    q, k, _ = qkv(1, tq, tk, hq, hkv, D=4, dtype=torch.float64, seed=tq + tk + o["block_size"])
    sel = vs.select(q, k, **o)
    assert sel.q_block == sel.k_block == o["block_size"] and sel.num_heads == hq
    assert rows_as_sets(sel.indices) == oracle(q[0], k[0], o, 0.5), "vertical-slash rows differ from the definition"


def test_varlen_equals_per_sequence():
    o = OPTS[0]
    lengths = [9, 14, 3]
    q, k, _ = qkv(1, sum(lengths), sum(lengths), 4, 2, D=4, dtype=torch.float64, seed=5)
    sel = vs.select(q, k, cu_seqlens=cu(lengths), **o)
    start = 0
    for n, L in enumerate(lengths):
        want = oracle(q[0, start:start + L], k[0, start:start + L], o, 0.5)
        got = rows_as_sets(sel.indices[n:n + 1, :, : -(-L // o["block_size"])])
        assert got == want, f"sequence {n} of the packed batch differs from its own selection"
        start += L


def test_budget_respected_and_causal():
    o = dict(block_size=4, n_vertical=3, n_slash=2, n_last=8, sinks=1, window=1)
    q, k, _ = qkv(1, 64, 64, 2, 1, D=8, seed=2)
    idx = vs.select(q, k, **o).indices
    n = torch.arange(16).view(1, 1, -1, 1)
    assert bool(((idx <= n) | (idx < 0)).all()), "a key block after the query block was selected"
    # at most one block per vertical column plus two per diagonal
    assert int((idx >= 0).sum(-1).max()) <= 3 + 2 * 2


@pytest.mark.parametrize("tq,tk", [(23, 23), (9, 23), (30, 10)])
def test_full_budget_equals_dense(tq, tk):
    q, k, v = qkv(1, tq, tk, 4, 2, D=8, dtype=torch.float64, seed=4)
    out = ak.attention(q, k, v, method="vertical_slash", block_size=4, n_vertical=30, n_slash=30, n_last=30,
                       sinks=1, window=1)
    ref, _ = naive_attention(q, k, v, causal=True)
    assert (out - ref).abs().max() < 1e-10


def test_decode_is_dense():
    q, k, v = qkv(1, 1, 30, 2, 1, D=8, dtype=torch.float64, seed=6)
    out = ak.attention(q, k, v, method="vertical_slash", block_size=4, n_vertical=1, n_slash=1, n_last=1,
                       sinks=0, window=0)
    ref, _ = naive_attention(q, k, v, causal=True)
    assert (out - ref).abs().max() < 1e-10, "a decode step must attend to the whole cache"


@pytest.mark.parametrize("bad, field", [({"n_vertical": 0}, "n_vertical"), ({"block_size": 0}, "block_size"),
                                        ({"sinks": 5, "n_vertical": 4}, "sinks"), ({"window": 9, "n_slash": 2}, "window"),
                                        ({"n_last": 1.5}, "n_last")])
def test_invalid_options_raise(bad, field):
    q, k, v = qkv(1, 8, 8, 2, 2)
    with pytest.raises(OptionError, match=rf"^{field}: expected"):
        ak.attention(q, k, v, method="vertical_slash", **{"block_size": 4, "n_vertical": 4, "n_slash": 4, "sinks": 1,
                                                        "window": 1, **bad})


def test_non_causal_raises():
    q, k, v = qkv(1, 8, 8, 2, 2)
    with pytest.raises(ak.AttnkitError, match="causal"):
        ak.attention(q, k, v, method="vertical_slash", causal=False)
