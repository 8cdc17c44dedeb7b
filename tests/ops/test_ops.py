"""The executors called directly: dense (sdpa and reference), masked, sparse."""

import pytest
import torch

import attnkit as ak
from attnkit.core import masks
from attnkit.core.oracle import naive_attention
from attnkit.core.selection import KVSelection
from tests.conftest import assert_close_rule


def qkv(B=2, Tq=40, Tk=40, Hq=4, Hkv=2, D=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()
    return mk(B, Tq, Hq, D), mk(B, Tk, Hkv, D), mk(B, Tk, Hkv, D)


def grads(out, inputs):
    g = torch.Generator().manual_seed(3)
    return torch.autograd.grad((out * torch.randn(out.shape, generator=g).to(out.dtype)).sum(), inputs)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_dense_backends_follow_the_rule(backend, dtype, causal) -> None:
    q, k, v = qkv(dtype=dtype)
    out = ak.ops.dense_attention(q, k, v, causal=causal, backend=backend)
    ref, _ = naive_attention(q, k, v, causal=causal)
    base, _ = naive_attention(q, k, v, causal=causal, compute_dtype=None)
    assert_close_rule(out, ref, base, f"{backend} out")
    for name, a, r, b in zip("qkv", grads(out, (q, k, v)), grads(ref, (q, k, v)), grads(base, (q, k, v))):
        assert_close_rule(a, r, b, f"{backend} d{name}")


def test_dense_sdpa_refuses_what_it_cannot_express() -> None:
    q, k, v = qkv(Tq=5)
    with pytest.raises(ak.AttnkitError, match="backend: 'sdpa' cannot serve this call: causal with Tq != Tk"):
        ak.ops.dense_attention(q, k, v, backend="sdpa")
    with pytest.raises(ak.AttnkitError, match="backend: expected one of"):
        ak.ops.dense_attention(q, k, v, backend="flash3")
    out, lse = ak.ops.dense_attention(q, k, v, return_lse=True)  # auto falls back to the reference
    assert lse.shape == (2, 4, 5) and lse.dtype == torch.float32


def test_masked_attention_matches_oracle() -> None:
    q, k, v = qkv(dtype=torch.float64)
    m = masks.sliding_window(5) | masks.sinks(1)
    out, lse = ak.ops.masked_attention(q, k, v, m, return_lse=True)
    ref, rlse = naive_attention(q, k, v, mask=m)
    assert (out - ref).abs().max() < 1e-12 and (lse - rlse).abs().max() < 1e-12
    with pytest.raises(ak.AttnkitError, match="mask: expected an attnkit.core.masks.Mask predicate, got Tensor"):
        ak.ops.masked_attention(q, k, v, torch.ones(40, 40, dtype=torch.bool))


def test_sparse_attention_matches_oracle_and_validates() -> None:
    q, k, v = qkv(dtype=torch.float64)
    blocks = torch.rand(2, 2, 5, 5, generator=torch.Generator().manual_seed(1)) < 0.5
    sel = KVSelection.from_dense_blocks(blocks, q_block=8, k_block=8)
    out, lse = ak.ops.sparse_attention(q, k, v, sel, return_lse=True)
    ref, rlse = naive_attention(q, k, v, selection=sel)
    assert (out - ref).abs().max() < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse))
    with pytest.raises(ak.AttnkitError, match="selection: expected an attnkit KVSelection, got Tensor"):
        ak.ops.sparse_attention(q, k, v, blocks)
    with pytest.raises(ak.AttnkitError, match=r"selection.indices: expected Nq = ceil\(40 / q_block 4\) = 10"):
        ak.ops.sparse_attention(q, k, v, KVSelection(sel.indices, 4, 8))
