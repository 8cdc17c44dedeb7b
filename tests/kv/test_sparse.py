"""Sparse decoding readers: quest, recycled, santa, routed (every registered selection) against their definitions."""

from __future__ import annotations

import pytest
import torch

from attnkit.core.contract import AttnkitError, OptionError, validate_attention
from attnkit.kv.paged import PagedLayerCache
from attnkit.kv.sparse import Quest, Recycled, Routed, Santa, slot_attention
from attnkit.registry import get_method, methods

from ..conftest import assert_close64
from .helpers import oracle_over_kept, random_cache

HQ = 4


def _q(seed: int, B: int = 2, tq: int = 1, D: int = 8) -> torch.Tensor:
    return torch.randn(B, tq, HQ, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_quest_bounds_and_top_pages():
    c, k, _ = random_cache(T=40, page_size=4)
    q = _q(1)
    r = Quest(topk=3)
    bounds = r.page_scores(q, c)
    G = HQ // c.num_heads
    for b in range(2):
        for h in range(c.num_heads):
            for p in range(10):
                kp = k[b, 4 * p: 4 * p + 4, h]
                direct = max(float(torch.maximum(q[b, 0, hq] * kp.amin(0), q[b, 0, hq] * kp.amax(0)).sum())
                             for hq in range(h * G, h * G + G))
                assert abs(float(bounds[b, h, p]) - direct) < 1e-5
                # an upper bound of every true score in the page
                assert all(float(q[b, 0, hq] @ kk) <= direct + 1e-5 for hq in range(h * G, h * G + G) for kk in kp)
    sel = r.select(q, c, 8 ** -0.5)
    assert sel.k_block == 4 and sel.indices.shape == (2, 2, 1, 3)
    # the page of the decode query (position 39: page 9) is always read, then the top bounds of the others
    others = bounds[..., :9].topk(2).indices
    want_pages = torch.cat([others, torch.full_like(others[..., :1], 9)], -1).sort(-1).values
    assert torch.equal(sel.indices[:, :, 0].long().sort(-1).values, want_pages)
    out = r.attend(q, c, backend="reference")
    pages = sel.indices[:, :, 0].long()
    want = oracle_over_kept(q, c, lambda b, h: torch.isin(torch.arange(c.capacity) // 4, pages[b, h]))
    assert_close64(out, want, rtol=1e-10)


def test_quest_always_reads_the_page_being_decoded():
    # a partly filled last page whose keys are small: by bound alone it would never be chosen
    c, k, _ = random_cache(T=38, page_size=4)
    B, H = c.batch, c.num_heads
    tiny = torch.full((B, 1, H, 8), 1e-3, dtype=torch.float64)
    c.append(tiny, tiny)  # position 38: page 9 holds positions 36, 37, 38
    q = _q(4)
    bounds = Quest(topk=2).page_scores(q, c)
    assert (bounds[..., 9] < bounds[..., :9].topk(2).values[..., -1]).all()  # loses on its bound
    sel = Quest(topk=2).select(q, c, 8 ** -0.5).indices[:, :, 0].long()
    assert (sel == 9).any(-1).all() and (sel >= 0).all()
    forced = Quest(topk=2).page_scores(q, c, force_newest=True)
    assert torch.isposinf(forced[..., 9]).all() and torch.equal(forced[..., :9], bounds[..., :9])


def test_quest_with_all_pages_equals_dense():
    c, _, _ = random_cache(T=37, page_size=4)
    q = _q(2)
    assert_close64(Quest(topk=100).attend(q, c, backend="reference"), oracle_over_kept(q, c), rtol=1e-10)


def test_recycled_full_steps_and_recycled_steps():
    c, _, _ = random_cache(T=30, page_size=4)
    r = Recycled(stride=3, topk=5)
    q0 = _q(3)
    mass = slot_attention(q0, c, 8 ** -0.5)
    assert_close64(r.attend(q0, c, backend="reference"), oracle_over_kept(q0, c), rtol=1e-10)  # full step
    top = mass.topk(5, dim=-1).indices
    for step in range(2):
        k1 = torch.randn(2, 1, 2, 8, dtype=torch.float64)
        c.append(k1, k1)
        q1 = _q(10 + step)
        out = r.attend(q1, c, backend="reference")
        want = oracle_over_kept(q1, c, lambda b, h: torch.isin(torch.arange(c.capacity), top[b, h])
                                | (c.logical()["pos"][b, h] >= 29))  # the full step's own token on
        assert_close64(out, want, rtol=1e-10)
    q3 = _q(20)
    k1 = torch.randn(2, 1, 2, 8, dtype=torch.float64)
    c.append(k1, k1)
    assert_close64(r.attend(q3, c, backend="reference"), oracle_over_kept(q3, c), rtol=1e-10)  # full again


def test_santa_is_seeded_and_unbiased():
    c, _, _ = random_cache(T=30, page_size=4)
    q = _q(4)
    a = Santa(samples=16, seed=7).attend(q, c)
    b = Santa(samples=16, seed=7).attend(q, c)
    assert torch.equal(a, b)
    assert not torch.equal(a, Santa(samples=16, seed=8).attend(q, c))
    exact = oracle_over_kept(q, c)
    for stratified in (True, False):
        s = Santa(samples=64, seed=0, stratified=stratified)
        mean = torch.stack([s.attend(q, c) for _ in range(200)]).mean(0)  # 12800 samples
        assert (mean - exact).abs().max() < 0.06
    # stratified sampling has lower variance than independent sampling
    var = [torch.stack([Santa(samples=32, seed=i, stratified=st).attend(q, c) for i in range(50)]).var(0).mean()
           for st in (True, False)]
    assert var[0] < var[1]


@pytest.mark.parametrize("method", [s.name for s in methods() if s.select is not None and s.capabilities.decode])
def test_routed_equals_sparse_attention_with_the_method_selection(method):
    """Every registered selection decodes through `Routed`: the same output as the sparse executor
    over the method's own selection of the cached keys (its example options for these shapes)."""
    from attnkit.ops import sparse_attention

    spec = get_method(method)
    c, k, v = random_cache(T=33, page_size=4)
    k1 = torch.randn(2, 1, 2, 8, dtype=torch.float64)
    c.append(k1, k1)
    kk, vv = torch.cat([k, k1], 1), torch.cat([v, k1], 1)
    q = _q(5)
    opts = spec.example(validate_attention(q, kk, vv, causal=True))
    out = Routed(method, opts).attend(q, c, backend="reference")
    sel = spec.selection(q, kk, causal=True, **opts)
    want = sparse_attention(q, kk, vv, sel, causal=True)
    assert_close64(out, want, rtol=1e-10)


def test_routed_needs_an_unevicted_cache_and_reader_options_are_checked():
    c, _, _ = random_cache(T=20, page_size=4)
    c.evict(torch.tensor([[[3]] * 2] * 2))
    with pytest.raises(Exception, match="cache"):
        Routed("moba", {"block_size": 4, "topk": 2}).attend(_q(0), c)
    for bad in (lambda: Quest(topk=0), lambda: Recycled(stride=0), lambda: Santa(samples=-1)):
        with pytest.raises(OptionError):
            bad()


def test_recycled_with_topk_covering_the_cache_equals_dense_between_full_steps():
    # fewer slots than topk: the remembered list is -1 padded, and slot 0 (the sink) must stay read
    c, _, _ = random_cache(T=10, page_size=4)
    r = Recycled(stride=4, topk=64)
    for step in range(4):
        k1 = torch.randn(2, 1, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        c.append(k1, k1)
        q = _q(20 + step)
        assert_close64(r.attend(q, c, backend="reference"), oracle_over_kept(q, c), rtol=1e-10)


@pytest.mark.parametrize("reader", [Quest(topk=2), Recycled(stride=2, topk=4), Santa(samples=4)], ids=lambda r: r.name)
@pytest.mark.parametrize("shape, match", [((2, 1, 3, 8), "Hq a multiple"), ((2, 0, 4, 8), "Tq >= 1"),
                                          ((2, 1, 4, 6), "D=8")])
def test_readers_validate_the_query_before_reading(reader, shape, match):
    c, _, _ = random_cache(T=12, page_size=4)
    with pytest.raises(AttnkitError, match=match):
        reader.attend(torch.randn(*shape, dtype=torch.float64), c)
    assert "recycled" not in c.state  # a rejected call leaves the reader's step counter alone


def test_recycled_rows_have_a_width_known_on_the_host():
    """Between full steps a row lists the remembered live slots and every token with a position from
    the full step's on (the definition), sorted, -1 padded to `topk + Tq + tokens appended since`
    (at most the cache's slots), whatever the device values are."""
    c, _, _ = random_cache(T=30, page_size=4)
    r = Recycled(stride=4, topk=5)
    assert r.select(_q(1), c, 8 ** -0.5) is None  # full step at position 29
    remembered = c.state["recycled"]["slots"]
    c.evict(torch.tensor([[[int(remembered[b, h, 0])] for h in range(2)] for b in range(2)]))  # one goes
    for step in range(3):
        k1 = torch.randn(2, 1, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        c.append(k1, k1)
        sel = r.select(_q(2 + step), c, 8 ** -0.5)
        idx = sel.indices
        assert sel.trusted and sel.k_block == 1 and idx.shape == (2, 2, 1, 5 + 1 + (step + 1))
        lg = c.logical()
        for b in range(2):
            for h in range(2):
                row = idx[b, h, 0].tolist()
                got = [s for s in row if s >= 0]
                assert got == sorted(got) and row[len(got):] == [-1] * (len(row) - len(got))
                want = {s for s in remembered[b, h].tolist() if s >= 0 and bool(lg["valid"][b, h, s])}
                want |= {s for s in range(lg["pos"].shape[-1]) if int(lg["pos"][b, h, s]) >= 29}
                assert set(got) == want and len(got) == len(want)
    c2, _, _ = random_cache(T=6, page_size=4)  # topk beyond the cache: the width stops at its slots
    r2 = Recycled(stride=4, topk=64)
    r2.select(_q(1), c2, 8 ** -0.5)
    k1 = torch.randn(2, 1, 2, 8, dtype=torch.float64)
    c2.append(k1, k1)
    assert r2.select(_q(2), c2, 8 ** -0.5).indices.shape == (2, 2, 1, c2.capacity)


@pytest.mark.parametrize("method", [s.name for s in methods() if s.select is not None and s.capabilities.decode])
def test_routed_from_the_host_prefix_equals_the_checked_path(method):
    """The selection built from `cache.prefix` (no read-back) lists the same slots per row as the one
    built from the cache's kept tokens, checked on the device (`prefix` unknown)."""
    spec = get_method(method)
    c, k, _ = random_cache(T=29, page_size=4)
    c.evict(torch.tensor([[[0]] * 2] * 2))
    z = torch.zeros(2, 1, 2, 8, dtype=torch.float64)
    c.append(z, z)  # slot 0 now holds the newest token: slots are not in position order
    c.evict(torch.full((2, 2, 1), -1))
    q = _q(6)
    c.prefix = None
    with pytest.raises(AttnkitError, match="cache"):  # position 0 was evicted
        Routed(method, {}).select(q, c, 8 ** -0.5)
    g = torch.Generator().manual_seed(7)
    perm = torch.randperm(29, generator=g)  # slots hold positions out of order, every one of 0..28
    k = torch.randn(2, 29, 2, 8, generator=g, dtype=torch.float64)
    c = PagedLayerCache(2, 2, 8, page_size=4, dtype=torch.float64)
    c.append(k, k, positions=perm.expand(2, 29))
    assert c.prefix is None
    c.prefix = 29  # true here; the cache cannot know it for given positions
    opts = spec.example(validate_attention(q, k, k, causal=True))
    fast = Routed(method, opts).select(q, c, 8 ** -0.5)
    c.prefix = None
    checked = Routed(method, opts).select(q, c, 8 ** -0.5)
    assert fast.indices.shape == checked.indices.shape
    rows = lambda s: [sorted(x for x in r if x >= 0) for r in s.indices.reshape(-1, s.width).tolist()]  # noqa: E731
    assert rows(fast) == rows(checked)
