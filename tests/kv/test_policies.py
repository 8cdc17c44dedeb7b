"""Eviction policies against their definitions, and decode over what they keep."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.core.contract import AttnkitError, OptionError
from attnkit.kv import KVSession, get_policy
from attnkit.kv.policies import ScoreInputs
from attnkit.kv.razor_heads import head_scores, retrieval_heads
from attnkit.ops.decode import decode_attention

from ..conftest import assert_close64
from .helpers import oracle_over_kept

B, T, HQ, H, D = 2, 40, 4, 2, 8
DT = torch.float64


def _inputs(seed: int = 0, t: int = T):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, t, HQ, D, generator=g, dtype=DT)
    k = torch.randn(B, t, H, D, generator=g, dtype=DT)
    v = torch.randn(B, t, H, D, generator=g, dtype=DT)
    return q, k, v


def _session(name: str, **opts) -> KVSession:
    return KVSession(get_policy(name, **opts), page_size=4)


def _kept_positions(s: KVSession, layer: int = 0) -> list:
    kept = s.cache.layer(layer).kept()
    return [[sorted(p for p in row if p >= 0) for row in b] for b in kept["pos"].tolist()]


def test_streaming_keeps_exactly_sinks_and_window_while_decoding():
    q, k, v = _inputs()
    s = _session("streaming", sinks=3, window=5)
    s.prefill(0, q, k, v)
    assert _kept_positions(s) == [[[0, 1, 2] + list(range(T - 5, T))] * H] * B
    for step in range(6):
        q1, k1, v1 = _inputs(step + 1, 1)
        s.step(0, q1, k1, v1)
        n = T + step + 1
        assert _kept_positions(s) == [[[0, 1, 2] + list(range(n - 5, n))] * H] * B


def _accumulated_attention(q, k, upto):
    """Direct H2O score: attention mass each key got from queries 0..upto-1 (summed over the group)."""
    G = HQ // H
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(G, 2)) * D ** -0.5
    causal = torch.arange(upto).view(-1, 1) >= torch.arange(upto).view(1, -1)
    p = torch.softmax(s[:, :, :upto, :upto].masked_fill(~causal, -math.inf), -1)
    return p.sum(2).view(B, H, G, upto).sum(2)  # [B, H, T]


def test_h2o_keeps_window_plus_heaviest_accumulated_attention():
    q, k, v = _inputs()
    budget, window = 12, 4
    s = _session("h2o", budget=budget, window=window)
    s.prefill(0, q, k, v)
    score = _accumulated_attention(q, k, T)
    for b in range(B):
        for h in range(H):
            heavy = score[b, h, : T - window].topk(budget - window).indices.tolist()
            expect = sorted(heavy + list(range(T - window, T)))
            assert _kept_positions(s)[b][h] == expect
    # accumulated scores live on: the cache's per-slot score equals the direct computation
    kept = s.cache.layer(0).kept()
    from attnkit.kv.policies import slot_scores
    got = slot_scores(ScoreInputs(0, s.cache.layer(0), kept, None, None, 1.0))
    want = score.gather(2, kept["pos"].clamp_min(0))
    assert_close64(got.double(), want, rtol=1e-6)


def test_h2o_evicts_lowest_score_when_decoding():
    q, k, v = _inputs()
    s = _session("h2o", budget=10, window=3)
    s.prefill(0, q, k, v)
    for step in range(4):
        q1, k1, v1 = _inputs(10 + step, 1)
        s.step(0, q1, k1, v1)
        assert s.cache.layer(0).num_kept().tolist() == [[10] * H] * B
        n = T + step + 1
        for row in _kept_positions(s)[0]:
            assert set(range(n - 3, n)) <= set(row)


def _snapkv_direct(q, k, w, kernel, pooling):
    """SnapKV votes written out: softmax rows of the last w queries, summed, pooled, summed over the group."""
    G = HQ // H
    votes = torch.zeros(B, H, T, dtype=DT)
    for b in range(B):
        for hq in range(HQ):
            h = hq // G
            for i in range(T - w, T):
                sc = (k[b, : i + 1, h] @ q[b, i, hq]) * D ** -0.5
                votes[b, h, : i + 1] += torch.softmax(sc, 0)
    pooled = torch.zeros_like(votes)
    r = kernel // 2
    for j in range(T):
        win = votes[..., max(0, j - r): j + r + 1]
        pooled[..., j] = win.amax(-1) if pooling == "max" else win.mean(-1)
    return pooled


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_snapkv_scores_equal_direct_computation(pooling):
    q, k, v = _inputs()
    pol = get_policy("snapkv", budget=16, obs_window=6, kernel_size=5, pooling=pooling)
    s = KVSession(None, page_size=4)
    s.prefill(0, q, k, v)
    inp = s.inputs(0, q, D ** -0.5)
    assert_close64(pol.votes(inp), _snapkv_direct(q, k, 6, 5, pooling), rtol=1e-10)
    pol.compress(inp)
    direct = _snapkv_direct(q, k, 6, 5, pooling)
    for b in range(B):
        for h in range(H):
            kept = _kept_positions(s)[b][h]
            assert len(kept) == 16 and kept[-6:] == list(range(T - 6, T))  # the observation window stays
            prefix = set(kept[:-6])
            dropped = [j for j in range(T - 6) if j not in prefix]
            # the kept prefix tokens are the top votes (max pooling makes ties; any tie order is valid)
            assert min(direct[b, h, j] for j in prefix) >= max(direct[b, h, j] for j in dropped)


def test_razor_full_cache_for_retrieval_heads_and_mean_compensation_token():
    q, k, v = _inputs()
    s = _session("razor", sinks=2, window=5, retrieval_heads={0: [1]})
    s.prefill(0, q, k, v)
    kept = s.cache.layer(0).kept()
    assert kept["valid"][:, 1].sum(-1).tolist() == [T] * B  # retrieval head: everything
    for b in range(B):
        row = kept["pos"][b, 0][kept["valid"][b, 0]].tolist()
        assert len(row) == 2 + 5 + 1
        dropped = list(range(2, T - 5))
        comp = [i for i, p in enumerate(kept["pos"][b, 0].tolist()) if p == 2]
        assert len(comp) == 1 and row.count(2) == 1  # the compensation token takes the first dropped position
        c = comp[0]
        assert_close64(kept["k"][b, 0, c], k[b, dropped, 0].mean(0), rtol=1e-12)
        assert_close64(kept["v"][b, 0, c], v[b, dropped, 0].mean(0), rtol=1e-12)
        assert abs(float(kept["bias"][b, 0, c]) - math.log(len(dropped))) < 1e-6


def test_retrieval_head_scores_find_an_induction_head():
    period, Dp = 8, 64
    tokens = torch.randperm(1000)[:period].repeat(2)
    emb = torch.randn(1000, Dp, dtype=DT) * 3
    x = emb[tokens].view(1, 2 * period, 1, Dp)
    # head 0 looks for the token that followed its token's previous occurrence: key j carries token j-1
    k_ind = torch.cat([torch.zeros(1, 1, 1, Dp, dtype=DT), x[:, :-1]], 1)
    k = torch.cat([k_ind, torch.randn(1, 2 * period, 1, Dp, dtype=DT)], 2)
    q = torch.cat([x, torch.randn(1, 2 * period, 1, Dp, dtype=DT)], 2)
    echo, ind = head_scores(q, k, period, scale=1.0)
    assert ind[0] > 0.9 and ind[1] < 0.5
    picked = retrieval_heads(echo.view(1, 2), ind.view(1, 2), induction_ratio=0.5, echo_ratio=0.0)
    assert picked.tolist() == [[True, False]]


POLICY_CASES = [
    ("streaming", dict(sinks=2, window=6)),
    ("h2o", dict(budget=10)),
    ("h2o", dict(budget=0.3, window=2)),
    ("snapkv", dict(budget=12, obs_window=4, kernel_size=3)),
    ("snapkv", dict(budget=0.5, obs_window=4, pooling="avg")),
    ("razor", dict(window=5, sinks=2, retrieval_heads={0: [0]})),
    ("razor", dict(budget=9, sinks=2)),
]


@pytest.mark.parametrize("name,opts", POLICY_CASES)
def test_decode_equals_attention_over_kept_tokens(name, opts):
    q, k, v = _inputs()
    s = _session(name, **opts)
    s.prefill(0, q, k, v)
    for step in range(3):
        q1, k1, v1 = _inputs(20 + step, 1)
        out = s.step(0, q1, k1, v1)
        assert_close64(out, oracle_over_kept(q1, s.cache.layer(0)), rtol=1e-10)
        ref = decode_attention(q1, s.cache.layer(0), backend="reference")
        assert_close64(ref, oracle_over_kept(q1, s.cache.layer(0)), rtol=1e-10)


@pytest.mark.parametrize("name,opts", [
    ("streaming", dict(sinks=2, window=T)), ("h2o", dict(budget=T + 3)), ("h2o", dict(budget=1.0)),
    ("snapkv", dict(budget=T, obs_window=4)), ("snapkv", dict(budget=1.0, obs_window=4)),
    ("razor", dict(sinks=4, window=T)),
])
def test_budget_at_least_cache_size_changes_nothing(name, opts):
    q, k, v = _inputs()
    full = KVSession(None, page_size=4)
    s = _session(name, **opts)
    o_full = full.prefill(0, q, k, v)
    o_pol = s.prefill(0, q, k, v)
    assert torch.equal(o_full, o_pol)
    assert s.cache.layer(0).num_kept().tolist() == [[T] * H] * B
    q1, k1, v1 = _inputs(5, 1)
    assert_close64(s.step(0, q1, k1, v1), full.step(0, q1, k1, v1), rtol=1e-12)


@pytest.mark.parametrize("name,opts,match", [
    ("h2o", dict(budget=0), "budget"), ("h2o", dict(budget=-3), "budget"), ("h2o", dict(budget=1.5), "budget"),
    ("h2o", dict(budget=0.0), "budget"), ("h2o", dict(budget=True), "budget"), ("h2o", dict(budget="all"), "budget"),
    ("snapkv", dict(budget=-0.5), "budget"), ("snapkv", dict(budget=3, obs_window=8), "budget"),
    ("snapkv", dict(budget=10, kernel_size=4), "kernel_size"), ("streaming", dict(budget=2, sinks=4), "budget"),
    ("streaming", dict(window=0), "window"), ("streaming", dict(), "budget"), ("razor", dict(budget=0), "budget"),
    ("razor", dict(budget=5, sinks=4), "budget"), ("h2o", dict(budget=4, window=9), "window"),
    ("h2o", dict(budget=4, bogus=1), "bogus"), ("nope", dict(), "policy"),
])
def test_bad_budgets_and_options_raise_naming_them(name, opts, match):
    with pytest.raises(OptionError, match=match):
        get_policy(name, **opts)


def test_ratio_budget_below_observation_window_raises():
    q, k, v = _inputs()
    s = _session("snapkv", budget=0.05, obs_window=8)
    with pytest.raises(OptionError, match="budget"):
        s.prefill(0, q, k, v)


@pytest.mark.parametrize("bad", ["q_heads", "q_dtype", "scale"])
def test_step_validates_before_appending_so_a_retry_appends_once(bad):
    q, k, v = _inputs()
    s = _session("streaming", sinks=2, window=8)
    s.prefill(0, q, k, v)
    q1, k1, v1 = _inputs(1, 1)
    seen = s.cache.layer(0).seen.clone()
    wrong = {"q_heads": dict(q=q1[:, :, :3]), "q_dtype": dict(q=q1.float()), "scale": dict(scale=-1.0)}[bad]
    args = dict(q=q1, k=k1, v=v1, scale=None) | wrong
    with pytest.raises(AttnkitError):
        s.step(0, args["q"], args["k"], args["v"], scale=args["scale"])
    assert torch.equal(s.cache.layer(0).seen, seen)  # nothing appended
    s.step(0, q1, k1, v1)
    assert torch.equal(s.cache.layer(0).seen, seen + 1)
