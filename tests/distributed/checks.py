"""Comparison of a spawned case's gathered results with the single-process oracle."""

from __future__ import annotations

import torch

from ..conftest import assert_close64, assert_close_rule
from .cases import Case, reference


def assert_matches_single_process(case: Case, got: dict) -> None:
    """Output and q/k/v gradients on the gathered sequence equal single-process attention:
    to 1e-9 relative in float64, by the 2x rule (DESIGN.md section 7) in lower precision."""
    oracle = reference(case)
    baseline = reference(case, compute_dtype=None) if case.dtype != torch.float64 else None
    for key in ("out", "dq", "dk", "dv"):
        name = f"{case.name} {key}"
        assert got[key].shape == oracle[key].shape, f"{name}: shape {tuple(got[key].shape)} != {tuple(oracle[key].shape)}"
        if baseline is None:
            assert_close64(got[key], oracle[key], name)
        else:
            assert_close_rule(got[key], oracle[key], baseline[key], name)
