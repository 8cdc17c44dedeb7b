"""The two-level state pass of the chunked form (chunk.py) equals the chunk-by-chunk loop.

Direct tests compare `_decay_scan` (gated linear) and `_TransitionScan` (delta family) with a
plain loop over chunks in float64, on states and gradients, for group sizes that give one
group, one chunk per group and several of each. End-to-end tests force the group size of
`chunk_forward` so that the number of chunks is not a multiple of it, is smaller than it, or is
1, and compare with the token-by-token recurrence, gradients included.
"""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

from attnkit.linear.chunk import (
    _TransitionScan,
    _decay_scan,
    chunk_forward,
    decay_scores,
    state_group_size,
)
from attnkit.linear.common import l2norm
from attnkit.linear.recurrent import recurrent_forward
from tests.conftest import assert_close64

from .cases import DELTA, make_inputs

F64 = torch.float64
# (chunks, chunks per group): one group, single-chunk groups, several groups, a single chunk
SCAN_SHAPES = [(1, 1), (6, 1), (6, 2), (6, 3), (6, 6), (12, 4)]


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def _grads(outputs: list[torch.Tensor], inputs: list[torch.Tensor], seed: int = 3) -> tuple[torch.Tensor, ...]:
    """Gradients of a fixed random linear functional of `outputs`."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


# --- gated linear: S_n = diag(exp(ell_n)) S_{n-1} + U_n ---------------------------------------


Pair = tuple[torch.Tensor, torch.Tensor]


def _decay_loop(U: torch.Tensor, ell: Optional[torch.Tensor], S0: Optional[torch.Tensor]) -> Pair:
    S = U.new_zeros(U[:, :, 0].shape) if S0 is None else S0
    states = []
    for n in range(U.shape[2]):
        states.append(S)
        S = (S if ell is None else ell[:, :, n].exp()[..., None] * S) + U[:, :, n]
    return torch.stack(states, 2), S


def _decay_two_level(U: torch.Tensor, ell: Optional[torch.Tensor], S0: Optional[torch.Tensor], G: int) -> Pair:
    L, lamx, E = _decay_scan(U, ell, S0, G)
    N = U.shape[2]
    E_of_chunk = E[:, :, torch.arange(N) // G]  # the state entering each chunk's group
    Sin = L + (E_of_chunk if lamx is None else lamx.exp()[..., None] * E_of_chunk)
    return Sin, E[:, :, -1]


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
@pytest.mark.parametrize("N,G", SCAN_SHAPES)
def test_decay_scan_equals_loop(N: int, G: int, decay: str, with_state: bool) -> None:
    gen = torch.Generator().manual_seed(N * 10 + G)
    B, H, K, V = 2, 2, 3, 4
    U = _rand(gen, B, H, N, K, V).requires_grad_()
    ell = None
    if decay != "none":
        ell = (-torch.rand(B, H, N, 1 if decay == "scalar" else K, generator=gen, dtype=F64)).requires_grad_()
    S0 = _rand(gen, B, H, K, V).requires_grad_() if with_state else None
    leaves = [t for t in (U, ell, S0) if t is not None]

    Sin_ref, S_ref = _decay_loop(U, ell, S0)
    Sin, S = _decay_two_level(U, ell, S0, G)
    assert_close64(Sin, Sin_ref, "entering states")
    assert_close64(S, S_ref, "final state")
    for name, a, b in zip("U ell S0".split(), _grads([Sin, S], leaves), _grads([Sin_ref, S_ref], leaves)):
        assert_close64(a, b, f"d{name}")


def test_decay_scan_strong_decay_stays_finite() -> None:
    """Exponents are differences <= 0: a total log decay of -1e5 underflows to 0, never inf."""
    gen = torch.Generator().manual_seed(0)
    U = _rand(gen, 1, 1, 64, 2, 2)
    ell = torch.full((1, 1, 64, 2), -1000.0, dtype=torch.float32)
    Sin, S = _decay_two_level(U.float(), ell, _rand(gen, 1, 1, 2, 2).float(), 8)
    Sin_ref, S_ref = _decay_loop(U.float(), ell, None)
    assert torch.isfinite(Sin).all() and torch.isfinite(S).all()
    torch.testing.assert_close(Sin[:, :, 1:], Sin_ref[:, :, 1:])  # S0 fully decayed after one chunk
    torch.testing.assert_close(S, S_ref)


# --- delta family: S_n = P_n S_{n-1} + Q_n ----------------------------------------------------


def _transition_loop(P: torch.Tensor, Q: torch.Tensor, S0: Optional[torch.Tensor]) -> Pair:
    S = Q.new_zeros(Q[:, :, 0].shape) if S0 is None else S0
    states = []
    for n in range(Q.shape[2]):
        states.append(S)
        S = P[:, :, n] @ S + Q[:, :, n]
    return torch.stack(states, 2), S


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("N,G", SCAN_SHAPES)
def test_transition_scan_equals_loop(N: int, G: int, with_state: bool) -> None:
    gen = torch.Generator().manual_seed(N * 10 + G)
    B, H, K, V = 2, 2, 3, 4
    P = (_rand(gen, B, H, N, K, K) / math.sqrt(K)).requires_grad_()
    Q = _rand(gen, B, H, N, K, V).requires_grad_()
    S0 = _rand(gen, B, H, K, V).requires_grad_() if with_state else None
    leaves = [t for t in (P, Q, S0) if t is not None]

    Sin_ref, S_ref = _transition_loop(P, Q, S0)
    Sin, S = _TransitionScan.apply(P, Q, S0, G)
    assert_close64(Sin, Sin_ref, "entering states")
    assert_close64(S, S_ref, "final state")
    for name, a, b in zip("P Q S0".split(), _grads([Sin, S], leaves), _grads([Sin_ref, S_ref], leaves)):
        assert_close64(a, b, f"d{name}")


def test_transition_scan_gradcheck() -> None:
    gen = torch.Generator().manual_seed(5)
    P = (_rand(gen, 1, 1, 5, 2, 2) / 2).requires_grad_()
    Q = _rand(gen, 1, 1, 5, 2, 3).requires_grad_()
    S0 = _rand(gen, 1, 1, 2, 3).requires_grad_()
    for G in (1, 5):  # five groups of one chunk, one group of five
        assert torch.autograd.gradcheck(lambda p, q, s: _TransitionScan.apply(p, q, s, G), (P, Q, S0))


# --- group size -------------------------------------------------------------------------------


def test_group_size_depth_and_padding() -> None:
    for N in range(1, 2049):
        G = state_group_size(N)
        groups = -(-N // G)
        assert 1 <= G <= N
        assert groups * G - N < groups, f"N={N}: G={G} pads a whole group"
        assert G - 1 + groups <= 2.5 * math.sqrt(N), f"N={N}: sequential depth {G - 1 + groups}"
    assert state_group_size(512) - 1 + 512 // state_group_size(512) == 47  # T = 32K, C = 64


# --- end to end: forced group sizes against the recurrence ------------------------------------

# (T, chunk size, group size): chunks not a multiple of the group size, fewer chunks than one
# group, a single chunk (alone and in a group of 3), one chunk per group
E2E = [(23, 4, 4), (10, 4, 5), (5, 8, 1), (5, 8, 3), (23, 4, 1), (23, 5, 2)]
E2E_METHODS = ["linear_attention", "simple_gla", "gla", "delta_rule", "gated_delta_rule", "kda"]


@pytest.mark.parametrize("T,C,G", E2E)
@pytest.mark.parametrize("name", E2E_METHODS)
def test_chunk_forward_group_sizes_equal_recurrent(name: str, T: int, C: int, G: int) -> None:
    x = make_inputs(name, B=2, T=T, H=2, K=4, V=3)
    if name in DELTA:  # contractive steps, as with use_qk_l2norm_in_kernel
        x["q"], x["k"] = l2norm(x["q"]), l2norm(x["k"])
    keys = [key for key in ("q", "k", "v", "g", "beta", "h0") if key in x]
    for key in keys:
        x[key].requires_grad_()
    args = (x["q"], x["k"], x["v"], x.get("g"), x.get("beta"), 0.5)

    o_ref, s_ref = recurrent_forward(*args, x["h0"])
    o, s = chunk_forward(*args, x["h0"], C, group_size=G)
    assert_close64(o, o_ref, f"{name} T={T} C={C} G={G} output")
    assert_close64(s, s_ref, f"{name} T={T} C={C} G={G} final state")
    g_ref = _grads([o_ref, s_ref], [x[key] for key in keys])
    g_chk = _grads([o, s], [x[key] for key in keys])
    for key, a, b in zip(keys, g_chk, g_ref):
        assert_close64(a, b, f"{name} T={T} C={C} G={G} d{key}", rtol=1e-8)


@pytest.mark.parametrize("name", ["gla", "gated_delta_rule"])
def test_chunk_forward_without_initial_state(name: str) -> None:
    x = make_inputs(name, B=1, T=37, H=2, K=4, V=3, with_state=False)
    args = (x["q"], x["k"], x["v"], x.get("g"), x.get("beta"), 0.5, None)
    o_ref, s_ref = recurrent_forward(*args)
    for G in (1, 2, 4, 10):
        o, s = chunk_forward(*args, 4, group_size=G)
        assert_close64(o, o_ref, f"{name} G={G} output")
        assert_close64(s, s_ref, f"{name} G={G} final state")


# --- per-channel decay scores -----------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("C", [1, 2, 3, 6, 8, 12])
def test_vector_decay_scores_gradcheck(C: int, strict: bool) -> None:
    """The halving scheme and its hand-written backward (C = 3, 6, 12 have odd blocks > 1)."""
    gen = torch.Generator().manual_seed(C)
    a, c = _rand(gen, 2, C, 3).requires_grad_(), _rand(gen, 2, C, 3).requires_grad_()
    g = -torch.rand(2, C, 3, generator=gen, dtype=F64)
    g[0, : C // 2] = 0.0  # no decay on some tokens: exponents exactly 0
    g.requires_grad_()
    b = g.cumsum(-2)
    dense = (a[:, :, None] * c[:, None] * (b[:, :, None] - b[:, None]).exp()).sum(-1)
    mask = torch.ones(C, C, dtype=torch.bool).tril(-1 if strict else 0)
    assert_close64(decay_scores(a, c, b, strict), dense * mask, "scores")
    assert torch.autograd.gradcheck(lambda a, c, g: decay_scores(a, c, g.cumsum(-2), strict), (a, c, g), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, g: decay_scores(a, a, g.cumsum(-2), strict), (a, g), fast_mode=True)


# --- no T x T tensor --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gla", "kda", "simple_gla", "delta_rule"])
def test_no_sequence_squared_tensor(name: str) -> None:
    """Every tensor made by the forward and backward stays far below T x T elements."""
    from torch.utils._python_dispatch import TorchDispatchMode

    T = 1024
    x = make_inputs(name, B=1, T=T, H=1, K=4, V=4, dtype=torch.float32, requires_grad=True)
    largest = [0]

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    largest[0] = max(largest[0], t.numel())
            return out

    with Track():
        o, s = chunk_forward(x["q"], x["k"], x["v"], x.get("g"), x.get("beta"), 0.5, x["h0"], 16)
        (o.sum() + s.sum()).backward()
    assert largest[0] <= T * 16, f"{name}: a tensor of {largest[0]} elements (T x T = {T * T})"
