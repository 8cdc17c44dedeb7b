"""The selection-aware exchange equals the single-process selection method and sends exactly the
selected key blocks of other ranks."""

from __future__ import annotations

import pytest

from .cases import CASES, selection_bytes
from .checks import assert_matches_single_process
from .conftest import case_result

SEL = [(w, c) for w in CASES for c in CASES[w] if c.op == "selection"]


@pytest.mark.parametrize("world,case", SEL, ids=[f"w{w}-{c.name}" for w, c in SEL])
def test_selection_ring_matches_single_process_method(world_results, world, case):
    assert_matches_single_process(case, case_result(world_results(world), case.name))


@pytest.mark.parametrize("world,case", SEL, ids=[f"w{w}-{c.name}" for w, c in SEL])
def test_selection_ring_sends_only_selected_blocks(world_results, world, case):
    res = case_result(world_results(world), case.name)
    want = selection_bytes(case, world)
    assert res["bytes_forward"] == want, f"{case.name}: sent {res['bytes_forward']} B forward, selected blocks are {want} B"
    # gradients of the same blocks travel back, in float64 like the inputs here
    assert res["bytes_backward"] == want, f"{case.name}: sent {res['bytes_backward']} B backward, expected {want} B"
    assert res["steps"] + res["skipped_steps"] == world, f"{case.name}: steps {res['steps']} + skipped " \
        f"{res['skipped_steps']} != {world}"


def test_local_selection_skips_far_steps(world_results):
    """Each block selecting itself and its predecessor (contiguous, world 4) needs only the previous
    rank: one exchange round, two skipped."""
    res = case_result(world_results(4), "selection_local_contiguous")
    assert (res["steps"], res["skipped_steps"]) == (2, 2), f"steps {res['steps']}, skipped {res['skipped_steps']}"
