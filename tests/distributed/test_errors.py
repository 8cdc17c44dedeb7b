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
