"""token_sparse (Token Sparse Attention): kept tokens against a loop oracle; gather-dense-scatter
against the float64 oracle restricted to the kept tokens (outputs, LSE, gradients)."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.core.contract import AttnkitError, OptionError, validate_attention
from attnkit.core.oracle import naive_attention
from attnkit.core.selection import KVSelection

from ._cases import compare, cu, qkv, rows_as_sets
from .test_vertical_slash import last_attention
from .test_xattention import coverage

ts = ak.methods.token_sparse


def oracle(q, k, coverage_frac, n_last, sinks, window, scale):
    """One sequence -> sorted kept tokens per query head."""
    T, Hq, _ = q.shape
    G = Hq // k.shape[1]
    out = []
    for h in range(Hq):
        score = {j: 0.0 for j in range(T)}
        for probs in last_attention(q, k, h, G, n_last, scale).values():
            for j, x in enumerate(probs):
                score[j] += x
        forced = {j for j in range(T) if j < sinks or j >= T - window}
        out.append(coverage(score, list(range(T)), forced, coverage_frac))
    return out


def token_selection(sel: KVSelection, T: int) -> KVSelection:
    """Per-token form: a kept query sees the kept keys (causal applies), any other query sees none."""
    ids = sel.indices[:, :, 0]  # [N, Hq, L']
    N, Hq, Lp = ids.shape
    kept = torch.zeros(N, Hq, T + 1, dtype=torch.bool).scatter_(-1, torch.where(ids < 0, T, ids).long(), True)[..., :T]
    rows = torch.where(kept.unsqueeze(-1), ids.unsqueeze(2).expand(N, Hq, T, Lp), torch.full((), -1, dtype=ids.dtype))
    return KVSelection(rows.contiguous(), 1, 1)


OPTS = [dict(coverage=0.6, n_last=4, sinks=1, window=2), dict(coverage=0.9, n_last=9, sinks=0, window=0),
        dict(coverage=0.3, n_last=1, sinks=3, window=1)]


@pytest.mark.parametrize("o", OPTS)
@pytest.mark.parametrize("T,hq,hkv", [(19, 2, 1), (24, 4, 2)])
def test_kept_tokens_match_definition(o, T, hq, hkv):
    q, k, _ = qkv(1, T, T, hq, hkv, D=4, dtype=torch.float64, seed=T + o["n_last"])
    sel = ts.kept(q, k, **o)
    assert sel.k_block == 1 and sel.q_block == T and sel.num_heads == hq
    assert rows_as_sets(sel.indices) == oracle(q[0], k[0], o["coverage"], o["n_last"], o["sinks"], o["window"], 0.5)


def test_varlen_kept_tokens_are_per_sequence():
    lengths = [9, 3, 14]
    o = OPTS[0]
    q, k, _ = qkv(1, sum(lengths), sum(lengths), 2, 1, D=4, dtype=torch.float64, seed=2)
    ids = ts.kept(q, k, cu_seqlens=cu(lengths), **o).indices
    start = 0
    for n, L in enumerate(lengths):
        want = oracle(q[0, start:start + L], k[0, start:start + L], o["coverage"], o["n_last"], o["sinks"], o["window"], 0.5)
        assert rows_as_sets(ids[n:n + 1]) == want, f"sequence {n} differs"
        start += L


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend,lse", [("reference", True), ("sdpa", False)])
def test_gather_dense_scatter_matches_oracle(dtype, backend, lse):
    T, o = 21, OPTS[0]
    q, k, v = qkv(1, T, T, 4, 2, D=8, dtype=dtype, seed=5)
    sel = token_selection(ts.kept(q, k, **o), T)

    def actual(q, k, v):
        return ak.attention(q, k, v, method="token_sparse", backend=backend, return_lse=lse, **o)

    def oracle_fn(cd, q, k, v):
        out, l = naive_attention(q, k, v, causal=True, selection=sel, compute_dtype=cd)
        return (out, l) if lse else out

    compare(actual, oracle_fn, {"q": q, "k": k, "v": v}, lse, f"token_sparse/{backend}")


def test_skipped_rows_are_zero_and_varlen_matches_per_sequence():
    lengths = [11, 6]
    o = OPTS[0]
    q, k, v = qkv(1, 17, 17, 2, 1, D=8, dtype=torch.float64, seed=3)
    out, lse = ak.attention(q, k, v, method="token_sparse", cu_seqlens=cu(lengths), return_lse=True, **o)
    start = 0
    for L in lengths:
        sl = slice(start, start + L)
        o1, l1 = ak.attention(q[:, sl], k[:, sl], v[:, sl], method="token_sparse", return_lse=True, **o)
        assert (out[:, sl] - o1).abs().max() < 1e-12 and torch.equal(torch.isinf(lse[..., sl]), torch.isinf(l1))
        start += L
    skipped = torch.isinf(lse)
    assert bool(skipped.any()), "coverage 0.6 should skip some rows"
    assert bool((out.transpose(1, 2)[skipped] == 0).all()), "a skipped query row must output 0"


def test_select_mask_is_the_executed_visibility():
    T, o = 19, OPTS[0]
    q, k, v = qkv(1, T, T, 4, 2, D=8, dtype=torch.float64, seed=7)
    mask = ts.select(q, k, **o)
    ref, _ = naive_attention(q, k, v, causal=True, mask=mask)
    out = ak.attention(q, k, v, method="token_sparse", backend="reference", **o)
    assert (out - ref).abs().max() < 1e-12, "select()'s mask differs from what the executor runs"


def test_declared_visibility_is_the_executed_one_under_varlen():
    """`SPEC.visibility` (what the registry-wired oracle reads) is, per packed sequence, the mask
    of the kept tokens; the executor's output equals attention under it."""
    lengths, o = [7, 0, 12], OPTS[0]
    T = sum(lengths)
    q, k, v = qkv(1, T, T, 4, 2, D=8, dtype=torch.float64, seed=3)
    cs = cu(lengths)
    call = validate_attention(q, k, v, causal=True, cu_seqlens=cs)
    mask = ts.SPEC.visibility(call, ts.TokenSparseOptions(**o))
    ref, lse_ref = naive_attention(q, k, v, causal=True, cu_seqlens=cs, mask=mask)
    out, lse = ak.attention(q, k, v, method="token_sparse", backend="reference", cu_seqlens=cs, return_lse=True, **o)
    assert (out - ref).abs().max() < 1e-12, "the declared visibility differs from what the executor runs"
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    assert ts.SPEC.visibility(validate_attention(q[:, -1:], k, v, causal=True), ts.TokenSparseOptions(**o)) is None


def test_full_coverage_equals_dense():
    q, k, v = qkv(1, 23, 23, 4, 2, D=8, dtype=torch.float64, seed=4)
    out = ak.attention(q, k, v, method="token_sparse", coverage=1.0, n_last=23, sinks=0, window=0)
    ref, _ = naive_attention(q, k, v, causal=True)
    assert (out - ref).abs().max() < 1e-10


def test_decode_dense_and_chunked_raises():
    q, k, v = qkv(1, 1, 30, 2, 1, D=8, dtype=torch.float64, seed=6)
    out = ak.attention(q, k, v, method="token_sparse", coverage=0.1)
    assert (out - naive_attention(q, k, v, causal=True)[0]).abs().max() < 1e-10
    q, k, v = qkv(1, 5, 30, 2, 1, D=8, seed=6)
    with pytest.raises(AttnkitError, match="^q: method 'token_sparse' needs Tq == Tk"):
        ak.attention(q, k, v, method="token_sparse")


@pytest.mark.parametrize("bad, field", [({"coverage": 0}, "coverage"), ({"n_last": 0}, "n_last"), ({"window": -1}, "window")])
def test_invalid_options_raise(bad, field):
    q, k, v = qkv(1, 8, 8, 2, 2)
    with pytest.raises(OptionError, match=rf"^{field}: expected"):
        ak.attention(q, k, v, method="token_sparse", **bad)


@pytest.mark.gpu
def test_sdpa_backend_gpu_matches_oracle():
    """At a real size on the GPU: the gather -> SDPA -> scatter path (bf16) against the float64
    oracle on the same kept tokens, outputs and gradients (the CPU twin is the test above)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the CPU twin runs the same path through CPU SDPA)")
    from tests.conftest import assert_close_rule

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2048, h, 128, generator=g).cuda().to(torch.bfloat16).requires_grad_() for h in (16, 4, 4))
    o = dict(coverage=0.8, n_last=64, sinks=4, window=64)
    kept = ts.kept(q.detach(), k.detach(), **o)
    sel = token_selection(KVSelection(kept.indices.cpu(), kept.q_block, kept.k_block), 2048)
    sel = KVSelection(sel.indices.cuda(), 1, 1)
    out = ak.attention(q, k, v, method="token_sparse", backend="sdpa", **o)
    ref, _ = naive_attention(q, k, v, causal=True, selection=sel)
    base, _ = naive_attention(q, k, v, causal=True, selection=sel, compute_dtype=None)
    assert_close_rule(out, ref, base, "token_sparse/sdpa out")
    do = torch.randn(out.shape, generator=g).cuda().to(torch.bfloat16)
    grads = [torch.autograd.grad((x.float() * do.float()).sum(), (q, k, v)) for x in (out, ref, base)]
    for name, a, r, b in zip("qkv", *grads):
        assert_close_rule(a, r, b, f"token_sparse/sdpa d{name}")
