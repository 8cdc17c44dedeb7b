"""The tensor contract (DESIGN.md section 3): one test per error path, and the layout adapters."""

import pytest
import torch

import attnkit as ak
from attnkit.core.contract import AttnkitError, validate_attention


def qkv(B=1, Tq=8, Tk=8, Hq=4, Hkv=2, D=16, Dv=16, dtype=torch.float32):
    return torch.randn(B, Tq, Hq, D, dtype=dtype), torch.randn(B, Tk, Hkv, D, dtype=dtype), torch.randn(B, Tk, Hkv, Dv, dtype=dtype)


def test_valid_call_normalises_scale_and_sizes() -> None:
    q, k, v = qkv(B=2, Tq=3, Tk=9, Hq=6, Hkv=3, D=16, Dv=8)
    call = validate_attention(q, k, v)
    assert (call.batch, call.tq, call.tk, call.hq, call.hkv, call.head_dim, call.head_dim_v) == (2, 3, 9, 6, 3, 16, 8)
    assert call.scale == pytest.approx(16 ** -0.5)
    assert validate_attention(q, k, v, scale=0.5).scale == 0.5


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q, k, v: ("x", k, v), r"q: expected a torch\.Tensor"),
        (lambda q, k, v: (q[0], k, v), r"q: expected 4 dims \[B, Tq, Hq, D\], got shape \(8, 4, 16\)"),
        (lambda q, k, v: (q.int(), k, v), r"q: expected dtype float16, bfloat16, float32 or float64"),
        (lambda q, k, v: (q, k.double(), v), r"k: expected dtype torch\.float32 \(same as q\)"),
        (lambda q, k, v: (q, k, v.double()), r"v: expected dtype torch\.float32"),
        (lambda q, k, v: (q, torch.cat([k, k]), v), r"k: expected batch 1 \(same as q\)"),
        (lambda q, k, v: (q, k, v[:, :5]), r"v: expected \[B, Tk, Hkv\] = \(1, 8, 2\)"),
        (lambda q, k, v: (q, k[..., :8], v), r"k: expected head dim 16 \(same as q\)"),
        (lambda q, k, v: (q[:, :, :3], k, v), r"k: expected a number of KV heads dividing Hq=3"),
        (lambda q, k, v: (q[..., :0], k[..., :0], v), r"q: expected a positive head dim"),
    ],
)
def test_tensor_errors_name_the_argument(mutate, match) -> None:
    q, k, v = mutate(*qkv())
    with pytest.raises(AttnkitError, match=match):
        ak.attention(q, k, v)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan"), "0.1", True])
def test_bad_scale(scale) -> None:
    with pytest.raises(AttnkitError, match="scale: expected a finite float > 0"):
        ak.attention(*qkv(), scale=scale)


def test_bad_causal_and_return_lse_types() -> None:
    with pytest.raises(AttnkitError, match="causal: expected a bool"):
        ak.attention(*qkv(), causal=1)
    with pytest.raises(AttnkitError, match="return_lse: expected a bool"):
        ak.attention(*qkv(), return_lse="yes")


@pytest.mark.parametrize(
    "cu, match",
    [
        ([0, 4, 8], r"cu_seqlens: expected an int32 torch\.Tensor"),
        (torch.tensor([0.0, 8.0]), r"cu_seqlens: expected dtype int32"),
        (torch.tensor([8], dtype=torch.int32), r"cu_seqlens: expected 1-D with at least 2 entries"),
        (torch.tensor([1, 8], dtype=torch.int32), r"cu_seqlens: expected cu_seqlens\[0\] == 0, got 1"),
        (torch.tensor([0, 5, 3, 8], dtype=torch.int32), r"cu_seqlens: expected nondecreasing offsets"),
        (torch.tensor([0, 4, 7], dtype=torch.int32), r"cu_seqlens: expected cu_seqlens\[-1\] == total tokens 8, got 7"),
    ],
)
def test_cu_seqlens_errors(cu, match) -> None:
    with pytest.raises(AttnkitError, match=match):
        ak.attention(*qkv(), cu_seqlens=cu)


def test_cu_seqlens_needs_batch_one_and_self_attention() -> None:
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    with pytest.raises(AttnkitError, match=r"q: expected batch size 1 when cu_seqlens is given"):
        ak.attention(*qkv(B=2), cu_seqlens=cu)
    with pytest.raises(AttnkitError, match=r"k: expected Tk == Tq == 8 with cu_seqlens"):
        ak.attention(*qkv(Tk=9), cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))


def test_unknown_method_backend_and_option() -> None:
    with pytest.raises(AttnkitError, match=r"method: expected one of \[.*'dense'.*\], got 'nope'"):
        ak.attention(*qkv(), method="nope")
    with pytest.raises(AttnkitError, match=r"backend: expected one of \['auto', 'sdpa', 'reference'\]"):
        ak.attention(*qkv(), backend="cuda-magic")
    with pytest.raises(ak.OptionError, match=r"window: not an option of method 'dense' \(its options: none\)"):
        ak.attention(*qkv(), window=3)


def test_explicit_backend_that_cannot_serve_raises_with_reasons() -> None:
    with pytest.raises(ak.BackendError, match=r"sdpa +cannot return the LSE"):
        ak.attention(*qkv(), backend="sdpa", return_lse=True)


def test_errors_raise_before_computation() -> None:
    # a wrong option on huge inputs fails at once: nothing is computed first
    q = torch.empty(1, 1 << 16, 1, 8)
    with pytest.raises(ak.OptionError):
        ak.attention(q, q, q, method="sliding_window", window=0)


def test_layout_adapters_roundtrip() -> None:
    x = torch.randn(2, 5, 3, 4)
    assert ak.to_bhtd(x).shape == (2, 3, 5, 4)
    assert torch.equal(ak.from_bhtd(ak.to_bhtd(x)), x)
    with pytest.raises(AttnkitError, match=r"x: expected 4 dims"):
        ak.to_bhtd(x[0])
    with pytest.raises(AttnkitError, match=r"x: expected 4 dims"):
        ak.from_bhtd(x[0])


def test_empty_inputs_are_refused_unless_the_entry_point_answers_them() -> None:
    q, k, v = qkv()
    with pytest.raises(AttnkitError, match=r"q: expected non-empty batch and sequence dims"):
        validate_attention(q[:, :0], k, v)  # ops that cannot answer an empty call
    assert validate_attention(q[:, :0], k, v, allow_empty=True).empty  # attention() answers it as SDPA does
