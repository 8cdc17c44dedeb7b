"""dense, sliding_window, dilated, strided through `attnkit.attention`: agreement with the float64
oracle run on the pattern written out from MECHANISMS.md (outputs, LSE, gradients), GQA, Tq != Tk,
varlen, and one test per option error."""

import pytest
import torch

import attnkit as ak
from attnkit.core.oracle import naive_attention
from attnkit.core.masks import Mask
from tests.conftest import assert_close64, assert_close_rule

# MECHANISMS.md's definitions, written independently of core.masks (i, j aligned positions; h query head)
DEFINITIONS = {
    "dense": ({}, lambda h, i, j: torch.ones_like(i - j, dtype=torch.bool)),
    "sliding_window": ({"window": 4, "sinks": 2}, lambda h, i, j: ((i - j).abs() < 4) | (j < 2)),
    "sliding_window_mswa": ({"window": [1, 2, 3, 8, 1, 2, 3, 8]}, lambda h, i, j: (i - j).abs() < torch.tensor([1, 2, 3, 8, 1, 2, 3, 8])[h]),
    "dilated": ({"dilation": 3, "window": 2}, lambda h, i, j: ((i - j) % 3 == 0) | ((i - j).abs() < 2)),
    "strided": ({"num_shards": 4, "window": 1}, lambda h, i, j: (j % 4 == h % 4) | ((i - j).abs() < 1)),
}


def _inputs(B, Tq, Tk, Hq, Hkv, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return mk(B, Tq, Hq, 8), mk(B, Tk, Hkv, 8), mk(B, Tk, Hkv, 8)


def _grads(out, lse, inputs):
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g).to(out.dtype)).sum() + (lse.masked_fill(torch.isinf(lse), 0) * torch.randn(lse.shape, generator=g).to(lse.dtype)).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("case", sorted(DEFINITIONS))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 21, 21, 8, 2), (1, 5, 30, 8, 8), (1, 1, 17, 8, 1)])
def test_matches_definition_float64(case, causal, shape) -> None:
    opts, definition = DEFINITIONS[case]
    method = case.replace("_mswa", "")
    q, k, v = _inputs(*shape)
    out, lse = ak.attention(q, k, v, method=method, causal=causal, return_lse=True, backend="reference", **opts)
    pred = Mask(lambda b, h, i, j: definition(h, i, j), case)
    ref, rlse = naive_attention(q, k, v, causal=causal, mask=pred)
    assert_close64(out, ref, f"{case} out")
    assert_close64(lse, rlse, f"{case} lse")
    for n, a, b in zip("qkv", _grads(out, lse, (q, k, v)), _grads(ref, rlse, (q, k, v))):
        assert_close64(a, b, f"{case} d{n}")


@pytest.mark.parametrize("case", sorted(DEFINITIONS))
def test_float32_and_bf16_follow_the_rule(case) -> None:
    opts, definition = DEFINITIONS[case]
    method = case.replace("_mswa", "")
    pred = Mask(lambda b, h, i, j: definition(h, i, j), case)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = _inputs(1, 48, 48, 8, 4, dtype=dtype)
        out = ak.attention(q, k, v, method=method, **opts)
        ref, _ = naive_attention(q, k, v, mask=pred)
        base, _ = naive_attention(q, k, v, mask=pred, compute_dtype=None)
        assert_close_rule(out, ref, base, f"{case} {dtype} out")


@pytest.mark.parametrize("case", sorted(DEFINITIONS))
def test_varlen_equals_per_sequence_runs(case) -> None:
    opts, _ = DEFINITIONS[case]
    method = case.replace("_mswa", "")
    q, k, v = _inputs(1, 23, 23, 8, 2)
    cu = torch.tensor([0, 9, 9, 23], dtype=torch.int32)
    out = ak.attention(q, k, v, method=method, cu_seqlens=cu, **opts)
    for s, e in ((0, 9), (9, 23)):
        one = ak.attention(q[:, s:e], k[:, s:e], v[:, s:e], method=method, **opts)
        assert_close64(out[:, s:e], one, f"{case} sequence [{s}, {e})")


@pytest.mark.parametrize(
    "method, opts, match",
    [
        ("sliding_window", {}, r"window: required option of method 'sliding_window' is missing"),
        ("sliding_window", {"window": 0}, r"window: expected an int >= 1, got 0"),
        ("sliding_window", {"window": 2.5}, r"window: expected an int >= 1, got 2.5"),
        ("sliding_window", {"window": []}, r"window: expected an int >= 1 or a non-empty per-head list"),
        ("sliding_window", {"window": [1, 2, 3]}, r"window: expected one window per query head \(4\), got 3"),
        ("sliding_window", {"window": 4, "sinks": -1}, r"sinks: expected an int >= 0, got -1"),
        ("sliding_window", {"window": 4, "block": 2}, r"block: not an option of method 'sliding_window' \(its options: window, sinks\)"),
        ("dilated", {"dilation": 0}, r"dilation: expected an int >= 1, got 0"),
        ("dilated", {"dilation": 2, "window": -3}, r"window: expected an int >= 0, got -3"),
        ("strided", {"num_shards": 0}, r"num_shards: expected an int >= 1, got 0"),
        ("strided", {"num_shards": 5}, r"num_shards: expected <= Hq=4 so the heads together cover every key, got 5"),
    ],
)
def test_option_errors(method, opts, match) -> None:
    q, k, v = _inputs(1, 8, 8, 4, 2, dtype=torch.float32)
    with pytest.raises(ak.OptionError, match=match):
        ak.attention(q, k, v, method=method, **opts)


def test_window_covering_everything_is_dense() -> None:
    q, k, v = _inputs(1, 30, 30, 4, 2)
    a = ak.attention(q, k, v, method="sliding_window", window=30)
    b = ak.attention(q, k, v, method="dense", backend="reference")
    assert_close64(a, b, "window >= T")
