"""Ring attention (zigzag and contiguous) equals single-process attention, forward and backward."""

from __future__ import annotations

import pytest

from .cases import BYTES_PAIRS, CASES
from .checks import assert_matches_single_process
from .conftest import case_result

RING = [(w, c) for w in CASES for c in CASES[w] if c.op == "ring"]


@pytest.mark.parametrize("world,case", RING, ids=[f"w{w}-{c.name}" for w, c in RING])
def test_ring_matches_single_process(world_results, world, case):
    assert_matches_single_process(case, case_result(world_results(world), case.name))


@pytest.mark.parametrize("world", sorted(BYTES_PAIRS))
def test_window_ring_sends_fewer_bytes(world_results, world):
    """The window-aware ring skips shards (or halves of them) the window never reaches: fewer bytes,
    counted on every rank, in both passes; outputs are checked by test_ring_matches_single_process."""
    pair = BYTES_PAIRS[world]
    res = world_results(world)
    w, f = case_result(res, pair["windowed"]), case_result(res, pair["full"])
    for label, got, want in (("full", f["steps"], pair["full_steps"]), ("windowed", w["steps"], pair["windowed_steps"])):
        assert got == want, f"{label} ring ran {got} steps, expected {want}"
    for label, got, want in (("full", f["bytes_forward"], pair["full_bytes"]),
                             ("windowed", w["bytes_forward"], pair["windowed_bytes"])):
        assert got == want, f"{label} ring forward sent {got} B over all ranks, expected {want} B (off by {got - want})"
    for phase in ("bytes_forward", "bytes_backward"):
        assert w[phase] < f[phase], f"{phase}: windowed ring sent {w[phase]} B, not fewer than full ring {f[phase]} B"


@pytest.mark.parametrize("world,case", RING, ids=[f"w{w}-{c.name}" for w, c in RING])
def test_ring_sends_what_the_plan_predicts(world_results, world, case):
    """Bytes sent (summed over ranks, each phase), steps and calls equal `explain_ring`'s prediction."""
    res = case_result(world_results(world), case.name)
    for got, want in (("bytes_forward", "predicted_forward"), ("bytes_backward", "predicted_backward"),
                      ("steps", "predicted_steps"), ("calls", "predicted_calls")):
        assert res[got] == res[want], f"{case.name}: {got} {res[got]} != plan's {res[want]}"
    assert list(res["kernels"]) == ["reference"], f"CPU ring used kernels {res['kernels']}"


def test_varlen_ring_skips_sequences_other_ranks_never_share(world_results):
    """Packed sequences that each fit one rank's shard: no step beyond the local one, nothing sent."""
    res = case_result(world_results(4), "ring_contiguous_causal_varlen_one_per_rank")
    assert res["steps"] == 1, f"ran {res['steps']} steps, expected 1"
    assert res["bytes_forward"] == 0 and res["bytes_backward"] == 0, (
        f"sent {res['bytes_forward']} B forward, {res['bytes_backward']} B backward, expected nothing")
