"""Bad input on one rank fails every rank with the same clear error, never a hang."""

from __future__ import annotations

import pytest

from .conftest import case_result


@pytest.mark.parametrize("world", [2, 4])
def test_wrong_sized_shard_fails_every_rank(world_results, world):
    results = world_results(world)
    messages = []
    for rank in range(world):
        res = case_result(results, "bad_shard", rank)
        assert res["raised"] == "AttnkitError", f"rank {rank}: expected AttnkitError, got {res['raised']!r}: {res['message']}"
        bad = res["bad_rank"]
        assert f"rank {bad} has" in res["message"], f"rank {rank}: message does not name rank {bad}: {res['message']}"
        assert res["message"].startswith("q:"), f"rank {rank}: message does not name the argument: {res['message']}"
        messages.append(res["message"])
    assert len(set(messages)) == 1, f"ranks got different messages: {messages}"


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_few_heads_points_to_hybrid(world_results, world):
    results = world_results(world)
    for rank in range(world):
        res = case_result(results, "few_heads", rank)
        assert res["raised"] == "AttnkitError", f"rank {rank}: expected AttnkitError, got {res['raised']!r}"
        assert "hybrid_attention" in res["message"] and "Hq=" in res["message"], (
            f"rank {rank}: message should name Hq and point to hybrid_attention: {res['message']}")


ULYSSES_REFUSALS = [
    (2, "kv_heads_indivisible", "k:", ("Hkv=3", "hybrid_attention")),
    (4, "heads_indivisible", "q:", ("Hq=6", "hybrid_attention")),
    (2, "gate_without_layout", "option_layout:", ("'g_cmp'", "'heads' or 'sequence'")),
]


@pytest.mark.parametrize("world,name,arg,words", ULYSSES_REFUSALS, ids=[c[1] for c in ULYSSES_REFUSALS])
def test_ulysses_refuses_clearly_on_every_rank(world_results, world, name, arg, words):
    """Head counts Ulysses cannot split, and a sequence-shaped tensor option without a layout, raise
    the same AttnkitError naming the argument on every rank (no rank hangs in the all-to-all)."""
    results = world_results(world)
    messages = set()
    for rank in range(world):
        res = case_result(results, name, rank)
        assert res["raised"] == "AttnkitError", f"rank {rank}: expected AttnkitError, got {res['raised']!r}"
        assert res["message"].startswith(arg), f"rank {rank}: message does not start with {arg!r}: {res['message']}"
        for w in words:
            assert w in res["message"], f"rank {rank}: message lacks {w!r}: {res['message']}"
        messages.add(res["message"])
    assert len(messages) == 1, f"ranks got different messages: {messages}"
