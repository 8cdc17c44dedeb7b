"""Methods declaring `Capabilities.decode_dense` attend to every visible key at a decode step
(`Tq == 1`): the same output as dense attention. Wired by the registry."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.core.contract import validate_attention
from attnkit.registry import methods

from ..conftest import assert_close64

DENSE_AT_DECODE = [s for s in methods() if s.capabilities.decode_dense]


def test_the_sparse_prefill_estimators_declare_it():
    assert {s.name for s in DENSE_AT_DECODE} >= {"vertical_slash", "xattention", "flexprefill", "token_sparse", "hip"}
    assert all(s.capabilities.decode for s in DENSE_AT_DECODE)


@pytest.mark.parametrize("spec", DENSE_AT_DECODE, ids=lambda s: s.name)
def test_a_decode_step_equals_dense_attention(spec):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 37, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 37, 2, 8, generator=g, dtype=torch.float64)
    prompt = torch.zeros(2, 37, 4, 8, dtype=torch.float64)
    opts = spec.example(validate_attention(prompt, k, v, causal=True))
    out = ak.attention(q, k, v, method=spec.name, causal=True, backend="reference", **opts)
    assert_close64(out, ak.attention(q, k, v, method="dense", causal=True, backend="reference"), rtol=1e-10)
