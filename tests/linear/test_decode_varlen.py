"""Decoding token by token and varlen packing agree with the chunked prefill (float64)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_close64

from .cases import METHODS, make_inputs, run, slice_tokens, step


@pytest.mark.parametrize("name", METHODS)
def test_decode_from_initial_state_equals_prefill(name: str) -> None:
    """Every token decoded from h0 reproduces the chunked outputs and final state."""
    x = make_inputs(name, T=13)
    o_chunk, s_chunk = run(name, x, backend="chunk", chunk_size=4)
    state = x["h0"]
    outs = []
    for t in range(13):
        o_t, state = step(name, x, t, state)
        assert o_t.shape == (2, 1, 2, 6) and state.shape == (2, 2, 8, 6)
        outs.append(o_t)
    assert_close64(torch.cat(outs, dim=1), o_chunk, f"{name} decoded outputs")
    assert_close64(state, s_chunk, f"{name} decoded final state")


@pytest.mark.parametrize("name", METHODS)
def test_prefill_then_decode(name: str) -> None:
    """Chunked prefill of 10 tokens, then 5 decode steps from its state == one chunked call."""
    x = make_inputs(name, T=15)
    o_full, s_full = run(name, x, backend="chunk", chunk_size=4)
    head = slice_tokens(x, 0, 10)
    head["h0"] = x["h0"]
    _, state = run(name, head, backend="chunk", chunk_size=4)
    outs = []
    for t in range(10, 15):
        o_t, state = step(name, x, t, state)
        outs.append(o_t)
    assert_close64(torch.cat(outs, dim=1), o_full[:, 10:], f"{name} decode after prefill")
    assert_close64(state, s_full, f"{name} state after prefill + decode")


def test_step_without_time_axis_matches() -> None:
    """A token may also be passed without its T axis ([B, H, K]); the output follows."""
    import attnkit.linear as L

    x = make_inputs("gla", T=1)
    o4, s4 = L.gla_step(x["q"], x["k"], x["v"], x["g"], x["h0"])
    o3, s3 = L.gla_step(x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], x["g"][:, 0], x["h0"])
    assert o4.shape == (2, 1, 2, 6) and o3.shape == (2, 2, 6)
    assert_close64(o3, o4[:, 0], "gla step output without T axis")
    assert_close64(s3, s4, "gla step state without T axis")


CU = [0, 5, 5, 17, 30]  # includes an empty sequence and lengths that do not divide the chunk


@pytest.mark.parametrize("backend", ["chunk", "reference"])
@pytest.mark.parametrize("name", METHODS)
def test_varlen_equals_per_sequence(name: str, backend: str) -> None:
    packed = make_inputs(name, B=1, T=30)
    packed["h0"] = make_inputs(name, B=4, T=1, seed=3)["h0"]  # one initial state per sequence
    cu = torch.tensor(CU, dtype=torch.int32)
    o, s = run(name, packed, backend=backend, chunk_size=4, cu_seqlens=cu)
    assert o.shape == (1, 30, 2, 6) and s.shape == (4, 2, 8, 6)
    for n in range(4):
        a, b = CU[n], CU[n + 1]
        if a == b:  # an empty sequence keeps its initial state
            assert_close64(s[n], packed["h0"][n], f"{name} {backend} state of empty sequence {n}")
            continue
        part = slice_tokens(packed, a, b, state_index=n)
        o_n, s_n = run(name, part, backend="reference")
        assert_close64(o[:, a:b], o_n, f"{name} {backend} varlen output of sequence {n}")
        assert_close64(s[n : n + 1], s_n, f"{name} {backend} varlen state of sequence {n}")


@pytest.mark.parametrize("name", ["gla", "kda"])
def test_varlen_gradients_match_per_sequence(name: str) -> None:
    """Gradients flow through the varlen packing the same way as through separate calls."""
    packed = make_inputs(name, B=1, T=30, requires_grad=True, with_state=False)
    cu = torch.tensor(CU, dtype=torch.int32)
    o, s = run(name, packed, backend="chunk", chunk_size=4, cu_seqlens=cu)
    (o.square().sum() + s.square().sum()).backward()
    grads = {key: t.grad.clone() for key, t in packed.items()}
    for t in packed.values():
        t.grad = None
    total = 0
    for n in range(4):
        if CU[n] == CU[n + 1]:
            continue
        part = slice_tokens(packed, CU[n], CU[n + 1])
        o_n, s_n = run(name, part, backend="reference", use_state=False)
        total = total + o_n.square().sum() + s_n.square().sum()
    total.backward()
    for key, t in packed.items():
        assert_close64(grads[key], t.grad, f"{name} varlen d{key}", rtol=1e-8)


def test_linear_attention_normalize_varlen_resets_key_sum() -> None:
    """normalize=True divides by the running key sum of each sequence (reset at boundaries)."""
    import attnkit.linear as L

    x = make_inputs("linear_attention", B=1, T=30, with_state=False)
    q, k, v = x["q"], x["k"].abs(), x["v"]  # positive features keep the normaliser away from 0
    q = q.abs()
    cu = torch.tensor(CU, dtype=torch.int32)
    o, _ = L.linear_attention(q, k, v, normalize=True, cu_seqlens=cu, chunk_size=4)
    for n in range(4):
        a, b = CU[n], CU[n + 1]
        if a == b:
            continue
        o_n, _ = L.linear_attention_recurrent(q[:, a:b], k[:, a:b], v[:, a:b], normalize=True)
        qs, ks = q[:, a:b] * q.shape[-1] ** -0.5, k[:, a:b]
        # direct definition: o_t = sum_{s<=t} (q_t.k_s) v_s / sum_{s<=t} (q_t.k_s), within the sequence
        scores = torch.einsum("bthk,bshk->bhts", qs, ks).tril()
        direct = torch.einsum("bhts,bshv->bthv", scores, v[:, a:b]) / scores.sum(-1).transpose(1, 2)[..., None]
        assert_close64(o[:, a:b], direct, f"normalized varlen sequence {n}")
        assert_close64(o_n, direct, f"normalized recurrent sequence {n}")
