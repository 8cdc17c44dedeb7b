"""`attnkit.layers.Attention`: equality with a plain PyTorch layer, every softmax-family method in
the layer (forward, backward, decode with the cache), RoPE, GQA, output gate, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnkit.core.contract import AttnkitError, OptionError, validate_attention
from attnkit.layers import Attention, LayerCache, RoPE
from attnkit.registry import methods
from tests.conftest import assert_close64

B, T, C, H = 2, 24, 32, 4


def plain_layer(layer: Attention, x: torch.Tensor) -> torch.Tensor:
    """The same layer in plain PyTorch: explicit [T, T] causal softmax, RoPE by complex rotation
    of channel pairs (i, i + r/2), KV heads repeated."""
    Bx, Tx, _ = x.shape
    Hq, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = (x @ layer.q_proj.weight.T).view(Bx, Tx, Hq, D)
    k = (x @ layer.k_proj.weight.T).view(Bx, Tx, Hkv, D)
    v = (x @ layer.v_proj.weight.T).view(Bx, Tx, Hkv, D)
    if layer.rope is not None:
        r = int(D * layer.rope.fraction) // 2 * 2
        freqs = torch.tensor([layer.rope.theta ** (-2 * i / r) for i in range(r // 2)], dtype=torch.float64)
        rot = torch.polar(torch.ones(Tx, r // 2, dtype=torch.float64), torch.arange(Tx, dtype=torch.float64)[:, None] * freqs)

        def rope(t: torch.Tensor) -> torch.Tensor:
            z = torch.complex(t[..., : r // 2], t[..., r // 2 : r]) * rot[None, :, None, :]
            return torch.cat([z.real, z.imag, t[..., r:]], dim=-1)

        q, k = rope(q), rope(k)
    k = k.repeat_interleave(Hq // Hkv, dim=2)
    v = v.repeat_interleave(Hq // Hkv, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    s = s.masked_fill(torch.ones(Tx, Tx, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)
    if layer.g_proj is not None:
        o = o * torch.sigmoid(x @ layer.g_proj.weight.T + layer.g_proj.bias).view(Bx, Tx, Hq, D)
    return o.reshape(Bx, Tx, Hq * D) @ layer.o_proj.weight.T


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("rope", [None, RoPE(), RoPE(theta=500.0, fraction=0.5)])
def test_dense_layer_equals_plain_pytorch(kv_heads: int, gate: bool, rope: RoPE) -> None:
    layer = Attention(C, H, kv_heads, "dense", rope=rope, output_gate=gate).double()
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    ref = plain_layer(layer, x)
    assert_close64(y, ref, "output")
    dy = torch.randn_like(y)
    params = [x] + list(layer.parameters())
    got = torch.autograd.grad(y, params, dy)
    want = torch.autograd.grad(ref, params, dy)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, g, w in zip(names, got, want):
        assert_close64(g, w, f"grad {name}")


def _fixed_options(name: str, spec, hkv: int) -> dict:
    """The method's example options for this shape, minus the tensors that the layer makes."""
    D = C // H
    call = validate_attention(torch.zeros(B, T, H, D), torch.zeros(B, T, hkv, D), torch.zeros(B, T, hkv, D))
    return {k: v for k, v in spec.example(call).items() if not isinstance(v, torch.Tensor)}


# Decode equality by method (everything not listed is held to exact equality with the full forward).
# Content-routed and permutation methods select over the keys present at each step:
# - "prefix": `stochastic` permutes the tokens present; future tokens shift the window in permuted
#   order, so a decode step equals the full forward of the tokens so far (its last row), not the
#   row of a longer sequence.
# - "run": `block_topk` pools each query block's queries to score key blocks (a prefill method); a
#   one-token decode step pools only itself, which is a different (valid) selection.
# - "estimate": the training-free prefill methods (vertical_slash, xattention, flexprefill, hip,
#   token_sparse) estimate their selection from the prompt's last queries, so a shorter prompt selects
#   differently; a one-token step attends densely to the cache.
# MoBA, NSA, DSA, power and the static patterns select for query i from keys <= i with block
# summaries of complete blocks only (the own block is always kept), so decode is exact.
DECODE = {"stochastic": "prefix", "block_topk": "run", **{m: "estimate" for m in (
    "vertical_slash", "xattention", "flexprefill", "hip", "token_sparse")}}
SOFTMAX = sorted(s.name for s in methods() if s.family != "linear")


@pytest.mark.parametrize("name", SOFTMAX)
def test_every_method_forward_backward_and_decode(name: str) -> None:
    spec = next(s for s in methods() if s.name == name)
    hkv = 2 if spec.capabilities.gqa else H
    layer = Attention(C, H, hkv, name, output_gate=True, **_fixed_options(name, spec, hkv)).double()
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (B, T, C) and bool(torch.isfinite(y).all())
    loss = y.square().sum()
    if layer.aux_loss is not None:  # DSA's indexer trains through its own loss
        loss = loss + layer.aux_loss
    loss.backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    used = [n for n, p in layer.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)]
    assert "q_proj.weight" in used and "o_proj.weight" in used
    if layer.inputs is not None:  # the learned method inputs are trained
        assert any(n.startswith("inputs.") for n in used), f"{name}: no gradient reaches the method inputs"

    if not spec.capabilities.decode:
        with pytest.raises(AttnkitError, match="cannot decode"):
            c = LayerCache()
            layer(x[:, :4].detach(), cache=c)
            layer(x[:, 4:5].detach(), cache=c)
        return
    with torch.no_grad():
        cache = LayerCache()
        prefill = 5
        steps = [layer(x[:, :prefill], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(prefill, T)]
        dec = torch.cat(steps, dim=1)
        assert cache.seen == T and cache.k.shape == (B, T, hkv, C // H)
        mode = DECODE.get(name, "full")
        if mode == "full":
            assert_close64(dec, y, f"{name}: decode vs full forward")
        elif mode == "prefix":
            for t in range(prefill, T):
                assert_close64(dec[:, t], layer(x[:, : t + 1])[:, -1], f"{name}: decode step {t} vs prefix forward")
        else:
            assert bool(torch.isfinite(dec).all())
            if mode == "run":
                assert_close64(dec[:, :prefill], y[:, :prefill], f"{name}: prefill part")


def test_chunked_prefill_equals_full() -> None:
    layer = Attention(C, H, 2, "sliding_window", window=5, sinks=2).double()
    x = torch.randn(B, T, C, dtype=torch.float64)
    cache = LayerCache()
    out = torch.cat([layer(x[:, :10], cache=cache), layer(x[:, 10:17], cache=cache), layer(x[:, 17:], cache=cache)], 1)
    assert_close64(out, layer(x), "chunked prefill")


def test_varlen_equals_separate_sequences() -> None:
    layer = Attention(C, H, 2, "dense").double()
    a, b = torch.randn(1, 7, C, dtype=torch.float64), torch.randn(1, 11, C, dtype=torch.float64)
    cu = torch.tensor([0, 7, 18], dtype=torch.int32)
    packed = layer(torch.cat([a, b], 1), cu_seqlens=cu)
    assert_close64(packed, torch.cat([layer(a), layer(b)], 1), "varlen")


def test_errors_name_the_argument() -> None:
    with pytest.raises(AttnkitError, match="method"):
        Attention(C, H, method="no_such_method")
    with pytest.raises(AttnkitError, match="LinearAttention"):
        Attention(C, H, method="gla")
    with pytest.raises(OptionError, match="topkk"):
        Attention(C, H, method="moba", block_size=4, topkk=2)
    with pytest.raises(OptionError, match="topk"):
        Attention(C, H, method="moba", block_size=4, topk=0)
    with pytest.raises(OptionError, match="g_cmp"):
        Attention(C, H, method="nsa", block_size=4, topk=2, g_cmp=torch.ones(1, 1, H))
    with pytest.raises(AttnkitError, match="num_kv_heads"):
        Attention(C, H, 3)
    with pytest.raises(OptionError, match="rope.fraction"):
        Attention(C, H, rope={"fraction": 0.0})
    layer = Attention(C, H)
    with pytest.raises(AttnkitError, match="x: expected"):
        layer(torch.randn(2, 5, C + 1))
    with pytest.raises(AttnkitError, match="cu_seqlens"):
        layer(torch.randn(1, 5, C), cache=LayerCache(), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
