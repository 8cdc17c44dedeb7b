"""The ring's plan, without processes: layouts round-trip, rectangle classes are exact, and the
calls of all ranks over all steps cover every visible (query, key) pair exactly once."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnkit.core import AttnkitError
from attnkit.distributed import hybrid_shard, hybrid_unshard, positions, shard, unshard
from attnkit.distributed.pattern import CAUSAL, FULL, NONE, Visibility
from attnkit.distributed.schedule import RingSchedule


def _visible(vis: Visibility, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """The rule written out directly (brute force over tiny ranges)."""
    same = None
    if vis.docs is not None:  # sequence-local positions, nothing across sequences
        bounds = torch.tensor(vis.docs)
        di, dj = (torch.bucketize(x, bounds, right=True) - 1 for x in (i, j))
        i, j, same = i - bounds[di], j - bounds[di], di == dj
    m = (j <= i) if vis.causal else torch.ones_like(i - j, dtype=torch.bool)
    if vis.window is not None:
        w = (i - j).abs() < vis.window
        if vis.sinks:
            w = (w & (j >= vis.sinks)) if vis.exclude_sinks else (w | (j < vis.sinks))
        m = m & w
    return m if same is None else m & same


# packed sequences over positions [0, 32): sorted cut points, empty sequences allowed
docs = st.lists(st.integers(0, 32), max_size=5).map(lambda cuts: tuple([0] + sorted(cuts) + [32]))
visibilities = st.builds(Visibility, st.booleans(), st.one_of(st.none(), st.integers(1, 12)), st.integers(0, 6),
                         st.booleans(), st.one_of(st.none(), docs))


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_round_trip(layout, world):
    x = torch.arange(2 * 8 * world * 3).view(2, 8 * world, 3)
    parts = [shard(x, world, r, layout) for r in range(world)]
    for r, p in enumerate(parts):
        assert torch.equal(p[0, :, 0] // 3, positions(layout, world, r, 8)), f"rank {r}: shard rows are not its positions"
    assert torch.equal(unshard(parts, layout), x), "unshard(shard(x)) != x"


def test_hybrid_shard_round_trip():
    x = torch.arange(32).view(1, 32, 1)
    parts = [hybrid_shard(x, 2, 2, r, "zigzag") for r in range(4)]
    assert torch.equal(torch.cat(parts[:2], 1), shard(x, 2, 0, "zigzag")), "Ulysses pieces of ring shard 0 differ"
    assert torch.equal(hybrid_unshard(parts, 2, 2, "zigzag"), x), "hybrid_unshard(hybrid_shard(x)) != x"


def test_shard_rejects_indivisible_length():
    with pytest.raises(AttnkitError, match="x: expected a sequence length divisible by 8"):
        shard(torch.zeros(1, 12, 1), 4, 0, "zigzag")
    with pytest.raises(AttnkitError, match="layout"):
        shard(torch.zeros(1, 12, 1), 2, 0, "spiral")


@given(vis=visibilities, qa=st.integers(0, 20), qn=st.integers(1, 6), ka=st.integers(0, 20), kn=st.integers(1, 6))
def test_classify_is_exact(vis, qa, qn, ka, kn):
    i = torch.arange(qa, qa + qn).view(-1, 1)
    j = torch.arange(ka, ka + kn).view(1, -1)
    m = _visible(vis, i, j)
    kind = vis.classify(qa, qa + qn, ka, ka + kn)
    if kind == NONE:
        assert not m.any(), f"{vis} q[{qa},{qa + qn}) k[{ka},{ka + kn}): classified none, {int(m.sum())} pairs visible"
    elif kind == FULL:
        assert m.all(), f"{vis}: classified full, {int((~m).sum())} pairs hidden"
    elif kind == CAUSAL:
        assert torch.equal(m, j <= i), f"{vis}: classified causal but the rule is not plain causality"
    else:
        assert m.any() and not m.all(), f"{vis}: classified partial but visibility is uniform"
    # the mask predicate for a partial call, local positions bottom-right aligned
    local = vis.mask(qa - (kn - qn), ka)(None, None, torch.arange(qn).view(-1, 1) + (kn - qn), torch.arange(kn).view(1, -1))
    assert torch.equal(local, m), f"{vis}: mask predicate differs from the rule in {int((local != m).sum())} pairs"


@given(vis=visibilities, world=st.integers(1, 4), layout=st.sampled_from(["zigzag", "contiguous"]))
def test_calls_cover_each_visible_pair_once(vis, world, layout):
    local = 4
    sched = RingSchedule(world, local, layout, vis)
    T = world * local
    count = torch.zeros(T, T, dtype=torch.int64)
    for r in range(world):
        qpos = positions(layout, world, r, local)
        for t in range(sched.steps):
            src = (r - t) % world
            segs = sched.segs[src]
            held = sched.carried(src, t)
            for c in sched.calls(r, t):
                assert set(c.k_segs) <= set(held), f"rank {r} step {t}: call uses segments {c.k_segs}, holds {held}"
                kpos = torch.cat([torch.arange(segs[g].start, segs[g].stop) for g in c.k_segs])
                i, j = qpos[c.q_lo:c.q_hi].view(-1, 1), kpos.view(1, -1)
                vis_c = {FULL: torch.ones_like(i - j, dtype=torch.bool), CAUSAL: j <= i}.get(c.kind, _visible(vis, i, j))
                count[i.expand_as(vis_c)[vis_c], j.expand_as(vis_c)[vis_c]] += 1
    ii, jj = torch.arange(T).view(-1, 1), torch.arange(T).view(1, -1)
    want = _visible(vis, ii, jj).long()
    assert torch.equal(count, want), (
        f"{vis}, W={world}, {layout}: {int((count > want).sum())} pairs computed twice or wrongly, "
        f"{int((count < want).sum())} visible pairs missed")


def test_shard_selection_cuts_query_rows_and_refuses_straddling_blocks():
    from attnkit.core.selection import KVSelection
    from attnkit.distributed import shard_selection

    rows = torch.arange(8, dtype=torch.int32).view(1, 1, 8, 1)  # query block n selects key block n
    sel = KVSelection(rows, q_block=2, k_block=2)
    part = shard_selection(sel, 2, 0, "zigzag", 8)  # rank 0 of 2: chunks 0 and 3 (tokens 0-3, 12-15)
    assert part.indices.flatten().tolist() == [0, 1, 6, 7], part.indices.flatten().tolist()
    with pytest.raises(AttnkitError, match="selection.q_block"):
        shard_selection(KVSelection(torch.zeros(1, 1, 3, 1, dtype=torch.int32), q_block=4, k_block=2), 2, 0,
                        "zigzag", 6)
