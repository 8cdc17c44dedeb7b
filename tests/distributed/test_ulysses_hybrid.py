"""Ulysses (any local method) and the Ulysses x ring hybrid equal single-process attention."""

from __future__ import annotations

import pytest

from .cases import CASES
from .checks import assert_matches_single_process
from .conftest import case_result

OTHERS = [(w, c) for w in CASES for c in CASES[w] if c.op in ("ulysses", "hybrid")]


@pytest.mark.parametrize("world,case", OTHERS, ids=[f"w{w}-{c.name}" for w, c in OTHERS])
def test_matches_single_process(world_results, world, case):
    assert_matches_single_process(case, case_result(world_results(world), case.name))
