"""`PagedLayerCache` / `KVCache`: append, gather, evict, per-head counts, pages, memory in bytes."""

from __future__ import annotations

import pytest
import torch

from attnkit.core.contract import AttnkitError
from attnkit.kv import KVCache, PagedLayerCache

from .helpers import random_cache


def test_append_keeps_keys_values_positions():
    c, k, v = random_cache(B=2, T=10, H=3, page_size=4)
    kept = c.kept()
    assert kept["pos"].tolist() == [[list(range(10))] * 3] * 2
    torch.testing.assert_close(kept["k"], k.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(kept["v"], v.transpose(1, 2), rtol=0, atol=0)
    assert c.seen.tolist() == [10, 10]
    assert c.page_table.shape == (6, 3) and int((c.page_table >= 0).sum()) == 18


def test_heads_keep_different_counts_and_pages_are_freed():
    c, k, v = random_cache(B=1, T=12, H=2, page_size=4)
    c.evict(torch.tensor([[[0, 1, 2, 3, 4], [-1, -1, -1, -1, 7]]]))
    assert c.num_kept().tolist() == [[7, 11]]
    assert int((c.page_table[0] >= 0).sum()) == 2  # head 0's first page went back to the pool
    assert c.kept()["pos"][0, 0, :7].tolist() == [5, 6, 7, 8, 9, 10, 11]
    slots = c.append(torch.randn(1, 3, 2, 8, dtype=torch.float64), torch.randn(1, 3, 2, 8, dtype=torch.float64))
    # head 1 reuses its one free slot (7) before taking a new page; head 0 fills slot 4 then a new page
    assert slots[0, 1].tolist()[0] == 7
    assert c.num_kept().tolist() == [[10, 14]]
    assert (c.page_table >= 0).sum(1).tolist() == [3, 4]  # one new page each
    assert c.kept()["pos"][0, 1].tolist() == list(range(7)) + list(range(8, 15))


def test_retain_and_gather_by_slot():
    c, k, _ = random_cache(B=1, T=9, H=1, page_size=4)
    c.retain(torch.tensor([[[8, 2, 5, -1]]]))
    kept = c.kept()
    assert kept["pos"].tolist() == [[[2, 5, 8]]]
    torch.testing.assert_close(kept["k"][0, 0], k[0, [2, 5, 8], 0], rtol=0, atol=0)


def test_memory_accounting_in_bytes():
    c, _, _ = random_cache(B=2, T=10, H=2, D=8, page_size=4, dtype=torch.float32)
    mem = c.memory()
    assert mem["kept"] == 2 * 2 * 10 * (8 + 8) * 4
    assert mem["pages"] == 2 * 2 * 3 * 4 * (8 + 8) * 4
    c.retain(torch.tensor([[[0, 1]] * 2] * 2))
    assert c.memory()["kept"] == 2 * 2 * 2 * 16 * 4
    assert c.memory()["pages"] == 2 * 2 * 1 * 4 * 16 * 4
    kv = KVCache(2)
    kv.append(0, torch.zeros(1, 3, 2, 4, dtype=torch.float16), torch.zeros(1, 3, 2, 6, dtype=torch.float16))
    kv.append(1, torch.zeros(1, 5, 1, 4, dtype=torch.float16), torch.zeros(1, 5, 1, 4, dtype=torch.float16))
    assert kv.nbytes() == (2 * 3 * 10 + 5 * 8) * 2


def test_page_bounds_follow_writes_and_evictions():
    c, k, _ = random_cache(B=1, T=8, H=1, page_size=4)
    kmin, kmax = c.page_bounds()
    page0 = int(c.page_table[0, 0])
    torch.testing.assert_close(kmin[page0].double(), k[0, :4, 0].amin(0), rtol=0, atol=1e-6)
    c.evict(torch.tensor([[[0]]]))
    kmin, kmax = c.page_bounds()
    torch.testing.assert_close(kmax[page0].double(), k[0, 1:4, 0].amax(0), rtol=0, atol=1e-6)


def test_pool_grows_past_capacity():
    c = PagedLayerCache(1, 1, 4, page_size=2, dtype=torch.float32)
    for _ in range(5):
        c.append(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))
    assert c.num_kept().item() == 15 and c.kept()["pos"][0, 0].tolist() == list(range(15))


@pytest.mark.parametrize("bad", [
    dict(k=torch.zeros(1, 2, 3, 4)), dict(k=torch.zeros(1, 2, 2, 4, dtype=torch.float16)),
])
def test_append_errors_name_the_argument(bad):
    c = PagedLayerCache(1, 2, 4, dtype=torch.float32)
    k = bad["k"]
    with pytest.raises(AttnkitError, match="k:"):
        c.append(k, torch.zeros(1, 2, 2, 4))


def test_constructor_and_evict_errors():
    with pytest.raises(AttnkitError, match="page_size"):
        PagedLayerCache(1, 1, 4, page_size=0)
    c, _, _ = random_cache(B=1, T=4, H=1)
    with pytest.raises(AttnkitError, match="slots"):
        c.evict(torch.tensor([[[99]]]))
    with pytest.raises(AttnkitError, match="layer"):
        KVCache(2).layer(3)


def test_compact_keeps_tokens_and_releases_pages():
    from attnkit.ops.decode import decode_attention

    c, k, v = random_cache(B=2, T=40, H=2, page_size=4)
    # scattered eviction (every third token of row 0, most of row 3): pages stay allocated, part empty
    drop = torch.full((2, 2, 40), -1)
    drop[0, 0, ::3] = torch.arange(0, 40, 3)
    drop[1, 1, :33] = torch.arange(33)
    c.evict(drop)
    c.score_pool.view(-1)[:] = torch.arange(c.score_pool.numel(), dtype=torch.float32)  # per-slot state moves too
    before = c.kept()
    q = torch.randn(2, 1, 4, 8, dtype=torch.float64)
    out = decode_attention(q, c, backend="reference")
    pages_before = c.num_pages
    c.compact()
    after = c.kept()
    assert torch.equal(after["valid"], before["valid"])
    ok = before["valid"]
    for name in ("k", "v", "pos", "bias", "score"):
        assert torch.equal(after[name][ok], before[name][ok]), name
    torch.testing.assert_close(decode_attention(q, c, backend="reference"), out, rtol=0, atol=0)
    n = c.num_kept()
    need = int((-(-n // 4)).sum())
    assert c.num_pages == need < pages_before
    assert c.free_pages.numel() == 0 and int((c.page_table >= 0).sum()) == need
    c.compact()  # already packed: unchanged
    assert c.num_pages == need
    c.append(torch.randn(2, 5, 2, 8, dtype=torch.float64), torch.randn(2, 5, 2, 8, dtype=torch.float64))
    assert (c.num_kept() == n + 5).all()


def test_pool_grows_by_need_not_doubling():
    c = PagedLayerCache(1, 2, 8, page_size=4, dtype=torch.float64, capacity_tokens=64)
    c.append(torch.randn(1, 64, 2, 8, dtype=torch.float64), torch.randn(1, 64, 2, 8, dtype=torch.float64))
    assert c.num_pages == 32  # 16 pages per row, the pool exactly full
    for _ in range(40):
        c.append(torch.randn(1, 1, 2, 8, dtype=torch.float64), torch.randn(1, 1, 2, 8, dtype=torch.float64))
    used = int((c.page_table >= 0).sum())
    assert used == 2 * 26  # 104 tokens per row
    assert used <= c.num_pages <= used + 2 * max(1, used // 32)  # headroom of 1/32, not 2x
    mem = c.memory()
    assert mem["kept"] == 2 * 104 * 2 * 8 * 8 and mem["reserved"] >= mem["pages"]


def test_renumber_counts_from_first_real_token():
    c, _, _ = random_cache(B=2, T=6, H=1, page_size=4)
    c.evict(torch.tensor([[[0, 1]], [[-1, -1]]]))  # row 0: two padding tokens
    real = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    c.renumber(real.cumsum(1) - 1)
    assert c.kept()["pos"][0, 0, :4].tolist() == [0, 1, 2, 3]
    assert c.seen.tolist() == [4, 6]
    with pytest.raises(AttnkitError, match="positions"):
        c.renumber(torch.zeros(2, 2, dtype=torch.long))


def test_page_bounds_survive_growth_and_compaction():
    c, _, _ = random_cache(B=1, T=8, H=2, page_size=4)
    c.page_bounds()
    for _ in range(3):  # growth keeps the incremental bounds of the old pages
        c.append(torch.randn(1, 4, 2, 8, dtype=torch.float64), torch.randn(1, 4, 2, 8, dtype=torch.float64))
        c.evict(torch.tensor([[[1, 5], [2, -1]]]))
        c.compact()
        kmin, kmax = c.page_bounds()
        k = c.k_pool  # bounds are kept in the key dtype
        ok = (c.pos_pool >= 0).unsqueeze(-1)
        used = ok.any(1).squeeze(-1)
        torch.testing.assert_close(kmin[used], torch.where(ok, k, float("inf")).amin(1)[used])
        torch.testing.assert_close(kmax[used], torch.where(ok, k, float("-inf")).amax(1)[used])


def test_host_counts_follow_appends_and_what_breaks_the_prefix():
    """`appended` (tokens appended to a row at most) and `prefix` (every row holds positions 0..n-1),
    kept on the host from shapes: the readers size their selections from them."""
    c, _, _ = random_cache(B=2, T=9, H=2, page_size=4)
    assert (c.appended, c.prefix) == (9, 9)
    one = torch.randn(2, 1, 2, 8, dtype=torch.float64)
    c.append(one, one)
    assert (c.appended, c.prefix) == (10, 10) and c.seen.tolist() == [10, 10]
    c.retain(torch.arange(10).view(1, 1, 10).expand(2, 2, 10))  # keeps everything: nothing evicted
    c.evict(torch.full((2, 2, 1), -1))
    c.compact()  # slots move, positions stay
    assert c.prefix == 10 and c.kept()["pos"].tolist() == [[list(range(10))] * 2] * 2
    for breaks in (lambda x: x.evict(torch.tensor([[[3]] * 2] * 2)),
                   lambda x: x.append(one, one, positions=torch.tensor([[12], [12]])),
                   lambda x: x.append(one, one, rows=torch.ones(2, 2, dtype=torch.bool)),
                   lambda x: x.renumber(torch.arange(10).expand(2, 10))):
        d, _, _ = random_cache(B=2, T=10, H=2, page_size=4)
        breaks(d)
        assert d.prefix is None
        d.append(one, one)
        assert d.prefix is None and d.appended >= 11
