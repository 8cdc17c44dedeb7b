"""Mask predicates against their definitions (MECHANISMS.md), checked on every (i, j) pair."""

import pytest
import torch

from attnkit.core import masks
from attnkit.core.contract import OptionError

T = 12


def pairs(mask, heads=1, causal=True, tq=T, tk=T):
    return masks.dense_mask(mask, 1, heads, tq, tk, causal)[0]


def test_causal_and_full() -> None:
    m = pairs(None)[0]
    assert torch.equal(m, torch.ones(T, T, dtype=torch.bool).tril())
    assert pairs(masks.full(), causal=False).all()
    assert torch.equal(pairs(masks.causal(), causal=False), pairs(None))


def test_sliding_window_with_sinks_definition() -> None:
    w, s = 3, 2
    m = pairs(masks.sliding_window(w) | masks.sinks(s))[0]
    for i in range(T):
        for j in range(T):
            assert bool(m[i, j]) == (j <= i and (i - j < w or j < s)), (i, j)


def test_per_head_windows() -> None:
    m = pairs(masks.sliding_window([1, 4]), heads=2)
    assert torch.equal(m[0], torch.eye(T, dtype=torch.bool))
    assert int(m[1].sum(-1).max()) == 4


def test_dilated_definition() -> None:
    m = pairs(masks.dilated(3, 2))[0]
    for i in range(T):
        for j in range(i + 1):
            assert bool(m[i, j]) == ((i - j) % 3 == 0 or i - j < 2), (i, j)


def test_strided_heads_cover_the_context() -> None:
    shards = 3
    m = pairs(masks.strided(shards), heads=shards)
    for h in range(shards):
        cols = m[h].any(0).nonzero().flatten()
        assert all(int(j) % shards == h for j in cols)
    assert torch.equal(m.any(0), pairs(None)[0]), "the heads together must cover every causal pair"


def test_composition_operators() -> None:
    a, b = masks.sliding_window(2), masks.sinks(1)
    assert torch.equal(pairs(a | b), pairs(a) | pairs(b))
    assert torch.equal(pairs(a & b), pairs(a) & pairs(b))
    assert torch.equal(pairs(~a, causal=False), ~pairs(a, causal=False))
    assert "window(2)" in repr(a | b)


def test_bottom_right_alignment_in_dense_mask() -> None:
    m = pairs(None, tq=2, tk=5)[0]
    assert m.tolist() == [[True] * 4 + [False], [True] * 5]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: masks.sliding_window(0), r"window: expected an int >= 1, got 0"),
        (lambda: masks.sliding_window([]), r"window: expected a non-empty per-head list"),
        (lambda: masks.sliding_window(torch.tensor([1])), r"window: expected an int or a list of ints"),
        (lambda: masks.sinks(-1), r"sinks: expected an int >= 0"),
        (lambda: masks.dilated(0), r"dilation: expected an int >= 1"),
        (lambda: masks.strided(2, window=-1), r"window: expected an int >= 0"),
    ],
)
def test_bad_mask_arguments(make, match) -> None:
    with pytest.raises(OptionError, match=match):
        make()
