"""`attnkit.layers.LinearAttention`: every linear-family method runs forward and backward, and
decoding with a state (prefill, then one token at a time) equals the full forward."""

from __future__ import annotations

import pytest
import torch

from attnkit.core.contract import AttnkitError, OptionError
from attnkit.layers import LayerCache, LinearAttention
from attnkit.layers.linear import GATES
from attnkit.registry import methods
from tests.conftest import assert_close64

B, T, C, H = 2, 20, 32, 4
LINEAR = sorted(s.name for s in methods() if s.family == "linear")


def _layer(name: str, **kw) -> LinearAttention:
    extra = {"num_layers": 4} if name == "lightning_attention" else {}
    return LinearAttention(C, H, name, layer_idx=1, **extra, **kw).double()


def test_every_registered_linear_method_has_a_layer() -> None:
    assert set(LINEAR) <= set(GATES), f"no gate recipe for {sorted(set(LINEAR) - set(GATES))}"


@pytest.mark.parametrize("short_conv", [False, True])
@pytest.mark.parametrize("name", LINEAR)
def test_forward_backward_and_decode_equals_full(name: str, short_conv: bool) -> None:
    layer = _layer(name, short_conv=short_conv, chunk_size=8)
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    assert bool(torch.isfinite(x.grad).all())
    no_grad = [n for n, p in layer.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not no_grad, f"{name}: parameters without gradient {no_grad}"
    with torch.no_grad():
        cache = LayerCache()
        steps = [layer(x[:, :7], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(7, T)]
        assert cache.seen == T and cache.state.shape == (B, H, C // H, C // H) and cache.state.dtype == torch.float64
        assert_close64(torch.cat(steps, 1), y, f"{name}: decode vs full forward", rtol=1e-8)


def test_varlen_equals_separate_sequences() -> None:
    layer = _layer("gated_delta_rule", short_conv=True)
    a, b = torch.randn(1, 6, C, dtype=torch.float64), torch.randn(1, 9, C, dtype=torch.float64)
    packed = layer(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 6, 15], dtype=torch.int32))
    assert_close64(packed, torch.cat([layer(a), layer(b)], 1), "varlen", rtol=1e-8)


def test_output_options_and_expand_v() -> None:
    x = torch.randn(B, T, C, dtype=torch.float64)
    for kw in ({"output_norm": False}, {"output_gate": False}, {"output_norm": False, "output_gate": False}, {"expand_v": 2.0}):
        assert _layer("gla", **kw)(x).shape == (B, T, C)


def test_errors_name_the_argument() -> None:
    with pytest.raises(AttnkitError, match="attnkit.layers.Attention"):
        LinearAttention(C, H, "dense")
    with pytest.raises(OptionError, match="initial_state"):
        LinearAttention(C, H, "gla", initial_state=torch.zeros(1, H, 8, 8))
    with pytest.raises(OptionError, match="chunk_size"):
        LinearAttention(C, H, "gla", chunk_size=0)
    with pytest.raises(OptionError, match="windw"):
        LinearAttention(C, H, "gla", windw=3)
    with pytest.raises(AttnkitError, match="expand_v"):
        LinearAttention(C, H, "gla", expand_v=-1)
