"""The chunked form equals the defining recurrence (float64): outputs, final states, gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import assert_close64

from .cases import METHODS, grad_keys, make_inputs, run

CHUNKS = [4, 7, 16, 64]  # T = 23: 7 and 16 do not divide T; 64 > T


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("name", METHODS)
def test_chunk_equals_recurrent_with_grads(name: str, chunk_size: int) -> None:
    x = make_inputs(name, requires_grad=True)
    keys = grad_keys(x)
    gen = torch.Generator().manual_seed(1)
    o_ref, s_ref = run(name, x, backend="reference")
    do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64)
    ds = torch.randn(s_ref.shape, generator=gen, dtype=torch.float64)
    g_ref = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), [x[k] for k in keys])

    o, s = run(name, x, backend="chunk", chunk_size=chunk_size)
    g_chk = torch.autograd.grad((o * do).sum() + (s * ds).sum(), [x[k] for k in keys])

    assert s.dtype == torch.float64 and s.shape == s_ref.shape
    assert_close64(o, o_ref, f"{name} C={chunk_size} output")
    assert_close64(s, s_ref, f"{name} C={chunk_size} final state")
    for key, a, b in zip(keys, g_chk, g_ref):
        assert_close64(a, b, f"{name} C={chunk_size} d{key}", rtol=1e-8)


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("name", METHODS)
def test_short_sequences(name: str, T: int) -> None:
    """T = 1 and T < chunk_size (a single, partly padded chunk)."""
    x = make_inputs(name, T=T)
    o_ref, s_ref = run(name, x, backend="reference")
    o, s = run(name, x, backend="chunk", chunk_size=16)
    assert o.shape == (2, T, 2, 6)
    assert_close64(o, o_ref, f"{name} T={T} output")
    assert_close64(s, s_ref, f"{name} T={T} final state")


@pytest.mark.parametrize("name", METHODS)
def test_no_initial_state_and_float32_state(name: str) -> None:
    """Without initial_state the state starts at 0; float32 inputs give a float32 state."""
    x = make_inputs(name, dtype=torch.float32, with_state=False)
    o, s = run(name, x, backend="chunk", chunk_size=8)
    o_ref, s_ref = run(name, x, backend="reference")
    assert s.dtype == torch.float32 and o.dtype == torch.float32
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4)


@given(
    name=st.sampled_from(METHODS),
    T=st.integers(1, 40),
    chunk_size=st.integers(1, 24),
    H=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_property_chunk_equals_recurrent(name: str, T: int, chunk_size: int, H: int, seed: int) -> None:
    x = make_inputs(name, B=1, T=T, H=H, K=4, V=3, seed=seed)
    o_ref, s_ref = run(name, x, backend="reference")
    o, s = run(name, x, backend="chunk", chunk_size=chunk_size)
    assert_close64(o, o_ref, f"{name} T={T} C={chunk_size} output")
    assert_close64(s, s_ref, f"{name} T={T} C={chunk_size} final state")
