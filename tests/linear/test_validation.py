"""Bad inputs raise AttnkitError naming the argument, before any computation (one test per path)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import attnkit.linear as L
from attnkit.core.contract import AttnkitError

B, T, H, K, V = 1, 6, 2, 4, 3


@pytest.fixture
def x() -> dict[str, torch.Tensor]:
    return {
        "q": torch.randn(B, T, H, K),
        "k": torch.randn(B, T, H, K),
        "v": torch.randn(B, T, H, V),
        "g": F.logsigmoid(torch.randn(B, T, H, K)),
        "gs": F.logsigmoid(torch.randn(B, T, H)),
        "beta": torch.rand(B, T, H),
    }


def raises(arg: str):  # type: ignore[no-untyped-def]
    return pytest.raises(AttnkitError, match=rf"^{arg}: expected")


def test_q_must_be_4d(x) -> None:
    with raises("q"):
        L.gla(x["q"][0], x["k"], x["v"], x["g"])


def test_k_shape_must_match_q(x) -> None:
    with raises("k"):
        L.gla(x["q"], x["k"][:, :, :1], x["v"], x["g"])


def test_v_shape_must_match_q(x) -> None:
    with raises("v"):
        L.gla(x["q"], x["k"], x["v"][:, :-1], x["g"])


def test_dtype_mismatch(x) -> None:
    with raises("k"):
        L.gla(x["q"], x["k"].double(), x["v"], x["g"])


def test_gate_must_be_log_space(x) -> None:
    with pytest.raises(AttnkitError, match=r"^g: expected log-space decay <= 0"):
        L.gla(x["q"], x["k"], x["v"], x["g"].abs() + 0.1)


def test_gate_shape(x) -> None:
    with raises("g"):
        L.gla(x["q"], x["k"], x["v"], x["gs"])  # scalar gate given to per-channel GLA


def test_gate_must_be_finite(x) -> None:
    g = x["gs"].clone()
    g[0, 0, 0] = float("-inf")
    with raises("g"):
        L.gated_delta_rule(x["q"], x["k"], x["v"], g, x["beta"])


def test_beta_range(x) -> None:
    with pytest.raises(AttnkitError, match=r"^beta: expected values in \[0, 1\]"):
        L.delta_rule(x["q"], x["k"], x["v"], x["beta"] + 1.0)


def test_beta_shape(x) -> None:
    with raises("beta"):
        L.kda(x["q"], x["k"], x["v"], x["g"], x["beta"][..., None])


def test_initial_state_shape(x) -> None:
    with raises("initial_state"):
        L.simple_gla(x["q"], x["k"], x["v"], x["gs"], initial_state=torch.zeros(B, H, V, K))


def test_initial_state_dtype(x) -> None:
    with pytest.raises(AttnkitError, match=r"^initial_state: expected dtype float32"):
        L.linear_attention(x["q"], x["k"], x["v"], initial_state=torch.zeros(B, H, K, V, dtype=torch.bfloat16))


def test_scale_must_be_positive(x) -> None:
    with raises("scale"):
        L.linear_attention(x["q"], x["k"], x["v"], scale=-1.0)


def test_chunk_size_must_be_positive(x) -> None:
    with raises("chunk_size"):
        L.linear_attention(x["q"], x["k"], x["v"], chunk_size=0)


def test_output_final_state_must_be_bool(x) -> None:
    with raises("output_final_state"):
        L.linear_attention(x["q"], x["k"], x["v"], output_final_state="yes")


def test_cu_seqlens_needs_batch_one(x) -> None:
    q2 = torch.randn(2, T, H, K)
    with raises("q"):
        L.linear_attention(q2, q2, torch.randn(2, T, H, V), cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32))


def test_cu_seqlens_must_end_at_T(x) -> None:
    with raises("cu_seqlens"):
        L.linear_attention(x["q"], x["k"], x["v"], cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32))


def test_varlen_initial_state_per_sequence(x) -> None:
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    with raises("initial_state"):
        L.linear_attention(x["q"], x["k"], x["v"], initial_state=torch.zeros(1, H, K, V), cu_seqlens=cu)


def test_unknown_backend(x) -> None:
    with raises("backend"):
        L.linear_attention(x["q"], x["k"], x["v"], backend="triton")


def test_fla_backend_refused_on_cpu(x) -> None:
    """fla is never a requirement: asking for it where it cannot run says why."""
    with pytest.raises(AttnkitError, match=r"^backend: 'fla' cannot serve this call: (flash-linear-attention not installed|runs on cuda)"):
        L.gla(x["q"], x["k"], x["v"], x["g"], backend="fla")


def test_auto_backend_without_fla_uses_pytorch(x) -> None:
    if importlib.util.find_spec("fla") is None:
        o, _ = L.gla(x["q"], x["k"], x["v"], x["g"])
        o_ref, _ = L.gla(x["q"], x["k"], x["v"], x["g"], backend="chunk")
        assert torch.equal(o, o_ref)
    else:  # fla installed, but the inputs are on the CPU: still the PyTorch form
        o, _ = L.gla(x["q"], x["k"], x["v"], x["g"])
        assert torch.equal(o, L.gla(x["q"], x["k"], x["v"], x["g"], backend="chunk")[0])


def test_normalize_rejects_initial_state(x) -> None:
    with raises("initial_state"):
        L.linear_attention(x["q"], x["k"], x["v"], initial_state=torch.zeros(B, H, K, V), normalize=True)


def test_g_and_g_gamma_are_exclusive(x) -> None:
    with raises("g_gamma"):
        L.simple_gla(x["q"], x["k"], x["v"], x["gs"], g_gamma=torch.zeros(H))


def test_g_gamma_shape(x) -> None:
    with raises("g_gamma"):
        L.simple_gla(x["q"], x["k"], x["v"], g_gamma=torch.zeros(H + 1))


def test_lightning_layer_idx_range(x) -> None:
    with raises("layer_idx"):
        L.lightning_attention(x["q"], x["k"], x["v"], layer_idx=4, num_layers=4)


def test_step_rejects_more_than_one_token(x) -> None:
    with raises("q"):
        L.gla_step(x["q"][:, :2], x["k"][:, :2], x["v"][:, :2], x["g"][:, :2])


def test_step_state_shape(x) -> None:
    with raises("state"):
        L.delta_rule_step(x["q"][:, :1], x["k"][:, :1], x["v"][:, :1], x["beta"][:, :1], torch.zeros(B, H, K, K))


def test_step_beta_range(x) -> None:
    with raises("beta"):
        L.kda_step(x["q"][:, :1], x["k"][:, :1], x["v"][:, :1], x["g"][:, :1], -x["beta"][:, :1] - 0.5)


@pytest.mark.parametrize("name", ["delta_rule", "gated_delta_rule", "kda"])
def test_delta_family_on_raw_keys_warns_that_the_state_can_diverge(name):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 16, generator=g) for _ in range(3))
    beta = torch.full((1, 64, 2), 0.9)
    gates = {"delta_rule": (), "gated_delta_rule": (torch.zeros(1, 64, 2),), "kda": (torch.zeros(1, 64, 2, 16),)}[name]
    fn, step = getattr(L, name), getattr(L, f"{name}_step")
    with pytest.warns(RuntimeWarning, match="use_qk_l2norm_in_kernel=True"):
        fn(q, k, v, *gates, beta)
    with pytest.warns(RuntimeWarning, match="use_qk_l2norm_in_kernel=True"):
        step(q[:, :1], k[:, :1], v[:, :1], *(x[:, :1] for x in gates), beta[:, :1])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # normalised keys (or the flag) are contractive: no warning
        fn(q, k, v, *gates, beta, use_qk_l2norm_in_kernel=True)
        fn(q, F.normalize(k, dim=-1), v, *gates, beta)
