"""The blockwise reference against the naive float64 oracle (DESIGN.md section 7).

Property tests draw shapes, GQA ratios, Tq != Tk, masks, selections and tile sizes; dtype tests
apply the 2x rule; varlen runs must equal per-sequence runs."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnkit.core import masks
from attnkit.core.oracle import naive_attention
from attnkit.core.reference import blockwise_attention
from attnkit.core.selection import KVSelection, cdiv
from tests.conftest import assert_close64, assert_close_rule


def _grads(out, lse, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    gl = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype)
    loss = (out * go).sum() + (lse.masked_fill(torch.isinf(lse), 0) * gl).sum()
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _inputs(B, Tq, Tk, Hq, Hkv, D, Dv, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return mk(B, Tq, Hq, D), mk(B, Tk, Hkv, D), mk(B, Tk, Hkv, Dv)


def _check64(q, k, v, **kw):
    chunks = {n: kw.pop(n) for n in ("q_chunk", "k_chunk") if n in kw}
    o, l = blockwise_attention(q, k, v, **kw, **chunks)
    o2, l2 = naive_attention(q, k, v, **kw)
    assert_close64(o, o2, "out")
    assert_close64(l, l2, "lse")
    for name, a, b in zip("qkv", _grads(o, l, (q, k, v)), _grads(o2, l2, (q, k, v))):
        assert_close64(a, b, f"d{name}")


@st.composite
def shapes(draw):
    hkv = draw(st.integers(1, 2))
    return dict(B=draw(st.integers(1, 2)), Tq=draw(st.integers(1, 24)), Tk=draw(st.integers(1, 24)),
                Hq=hkv * draw(st.sampled_from([1, 2, 4])), Hkv=hkv, D=draw(st.sampled_from([4, 8])),
                Dv=draw(st.sampled_from([4, 6])))


@given(s=shapes(), causal=st.booleans(), qc=st.integers(1, 9), kc=st.integers(1, 9))
def test_dense_matches_oracle(s, causal, qc, kc) -> None:
    _check64(*_inputs(**s), causal=causal, q_chunk=qc, k_chunk=kc)


MASKS = {
    "window": lambda h: masks.sliding_window(3),
    "window_per_head": lambda h: masks.sliding_window([1 + 2 * i for i in range(h)]),
    "window_sinks": lambda h: masks.sliding_window(2) | masks.sinks(2),
    "dilated": lambda h: masks.dilated(3, 1),
    "strided": lambda h: masks.strided(min(h, 3), 1),
    "not_sinks": lambda h: ~masks.sinks(3) & masks.causal(),
}


@given(s=shapes(), causal=st.booleans(), name=st.sampled_from(sorted(MASKS)), qc=st.integers(1, 9), kc=st.integers(1, 9))
def test_masked_matches_oracle(s, causal, name, qc, kc) -> None:
    _check64(*_inputs(**s), causal=causal, mask=MASKS[name](s["Hq"]), q_chunk=qc, k_chunk=kc)


@st.composite
def selections(draw, B, Hq, Hkv, Tq, Tk):
    qb, kb = draw(st.sampled_from([1, 2, 5])), draw(st.sampled_from([1, 3, 4]))
    hsel = draw(st.sampled_from(sorted({Hq, Hkv, 1})))
    nq, nk = cdiv(Tq, qb), cdiv(Tk, kb)
    width = draw(st.integers(1, nk + 1))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    # random duplicate-free rows: a random permutation's prefix, with random -1 padding
    perm = torch.rand(B, hsel, nq, nk, generator=g).argsort(-1)[..., :width] if width <= nk else \
        torch.cat([torch.rand(B, hsel, nq, nk, generator=g).argsort(-1), torch.full((B, hsel, nq, width - nk), -1)], -1)
    drop = torch.rand(perm.shape, generator=g) < 0.3
    idx = torch.where(drop, torch.full_like(perm, -1), perm).to(torch.int32)
    return KVSelection(idx, qb, kb)


@given(data=st.data(), s=shapes(), causal=st.booleans(), qc=st.integers(1, 9), kc=st.integers(1, 9))
def test_selection_matches_oracle(data, s, causal, qc, kc) -> None:
    sel = data.draw(selections(s["B"], s["Hq"], s["Hkv"], s["Tq"], s["Tk"]))
    sel.validate(s["B"], s["Hq"], s["Hkv"], s["Tq"], s["Tk"])
    _check64(*_inputs(**s), causal=causal, selection=sel, q_chunk=qc, k_chunk=kc)


@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=4), causal=st.booleans(),
       hkv=st.integers(1, 2), group=st.sampled_from([1, 3]), name=st.sampled_from([None] + sorted(MASKS)))
def test_varlen_equals_per_sequence_runs(lengths, causal, hkv, group, name) -> None:
    total = sum(lengths)
    if total == 0:
        lengths = lengths + [3]
        total = 3
    hq = hkv * group
    q, k, v = _inputs(1, total, total, hq, hkv, 8, 8)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    mask = MASKS[name](hq) if name else None
    o, l = blockwise_attention(q, k, v, causal=causal, cu_seqlens=cu, mask=mask, q_chunk=4, k_chunk=3)
    start = 0
    for n in lengths:
        if n:
            sl = slice(start, start + n)
            o1, l1 = blockwise_attention(q[:, sl], k[:, sl], v[:, sl], causal=causal, mask=mask)
            assert_close64(o[:, sl], o1, f"varlen out of a length-{n} sequence")
            assert_close64(l[..., sl], l1, f"varlen lse of a length-{n} sequence")
        start += n
    o2, l2 = naive_attention(q, k, v, causal=causal, cu_seqlens=cu, mask=mask)
    for name_, a, b in zip("qkv", _grads(o, l, (q, k, v)), _grads(o2, l2, (q, k, v))):
        assert_close64(a, b, f"varlen d{name_}")


def test_varlen_selection_uses_local_blocks() -> None:
    lengths = [5, 7]
    q, k, v = _inputs(1, 12, 12, 2, 1, 8, 8)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    # sequence 0 sees its key block 0 only; sequence 1 sees its key block 1 only (local numbering)
    idx = torch.full((2, 1, 7, 1), -1, dtype=torch.int32)
    idx[0, :, :5, 0] = 0
    idx[1, :, :, 0] = 1
    sel = KVSelection(idx, 1, 4)
    o, l = blockwise_attention(q, k, v, causal=False, cu_seqlens=cu, selection=sel)
    s0 = KVSelection(idx[:1, :, :5], 1, 4)
    o0, _ = blockwise_attention(q[:, :5], k[:, :5], v[:, :5], causal=False, selection=s0)
    s1 = KVSelection(idx[1:], 1, 4)
    o1, _ = blockwise_attention(q[:, 5:], k[:, 5:], v[:, 5:], causal=False, selection=s1)
    assert_close64(o[:, :5], o0, "sequence 0")
    assert_close64(o[:, 5:], o1, "sequence 1")


def test_fully_masked_rows_give_zero_output_and_minus_inf_lse() -> None:
    q, k, v = _inputs(1, 4, 6, 2, 2, 8, 8)
    # Tq > Tk-aligned rows: with causal and Tq=4 < Tk=6 every row sees something; use a mask
    # that hides everything from queries 0 and 2 (positions 2 and 4 in key coordinates)
    hide = masks.Mask(lambda b, h, qp, kp: (qp != 2) & (qp != 4), "hide")
    o, l = blockwise_attention(q, k, v, causal=True, mask=hide)
    assert torch.all(o[:, [0, 2]] == 0) and torch.all(torch.isinf(l[..., [0, 2]]) & (l[..., [0, 2]] < 0))
    assert torch.isfinite(l[..., [1, 3]]).all()
    dq, dk, dv = _grads(o, l, (q, k, v))
    assert torch.all(dq[:, [0, 2]] == 0) and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    # Tq > Tk with causal: the first Tq - Tk queries see no key (bottom-right alignment)
    q2, k2, v2 = _inputs(1, 5, 3, 1, 1, 4, 4)
    o2, l2 = blockwise_attention(q2, k2, v2, causal=True)
    assert torch.all(o2[:, :2] == 0) and torch.isinf(l2[..., :2]).all()
    o3, l3 = naive_attention(q2, k2, v2, causal=True)
    assert_close64(o2, o3, "out")


def test_causal_bottom_right_alignment() -> None:
    # query i of Tq sees keys j <= i + Tk - Tq: the last query sees everything, the first sees Tk - Tq + 1 keys
    q, k, v = _inputs(1, 3, 7, 1, 1, 4, 4)
    o, _ = blockwise_attention(q, k, v, causal=True)
    o_first, _ = blockwise_attention(q[:, :1], k[:, :5], v[:, :5], causal=False)
    o_last, _ = blockwise_attention(q[:, 2:], k, v, causal=False)
    assert_close64(o[:, :1], o_first, "first query")
    assert_close64(o[:, 2:], o_last, "last query")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_low_precision_within_twice_the_pytorch_error(dtype, causal) -> None:
    q, k, v = _inputs(2, 70, 90, 4, 2, 32, 32, dtype=dtype)
    mask = masks.sliding_window(40) | masks.sinks(2)
    o, l = blockwise_attention(q, k, v, causal=causal, mask=mask, q_chunk=16, k_chunk=32)
    o64, l64 = naive_attention(q, k, v, causal=causal, mask=mask)
    ob, lb = naive_attention(q, k, v, causal=causal, mask=mask, compute_dtype=None)
    assert o.dtype == dtype and l.dtype == torch.float32
    assert_close_rule(o, o64, ob, "out")
    assert_close_rule(l, l64, lb, "lse", floor_ulps=64)
    for name, a, ref, base in zip("qkv", _grads(o, l, (q, k, v)), _grads(o64, l64, (q, k, v)), _grads(ob, lb, (q, k, v))):
        assert a.dtype == dtype
        assert_close_rule(a, ref, base, f"d{name}")


def test_chunking_never_builds_a_full_score_matrix(monkeypatch) -> None:
    # every matmul the reference issues is at most one tile: [.., Cq, Ck] with Cq*Ck << Tq*Tk
    import attnkit.core.reference as ref

    seen = []
    real = torch.matmul

    def spy(a, b):
        out = real(a, b)
        seen.append(out.shape[-2] * out.shape[-1])
        return out

    monkeypatch.setattr(ref.torch, "matmul", spy)
    q, k, v = _inputs(1, 256, 256, 1, 1, 8, 8, dtype=torch.float32)
    o, l = blockwise_attention(q, k, v, causal=True, q_chunk=32, k_chunk=64)
    o.sum().backward()
    monkeypatch.undo()
    assert seen and max(seen) <= 32 * 64, f"largest product {max(seen)} > one tile (32 x 64)"


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("where", ["k", "v"])
def test_hidden_non_finite_keys_and_values_leave_other_rows_bitwise_unchanged(bad, where):
    # a non-finite future key/value (causal) and one in another varlen sequence reach no other row,
    # forward and backward; the rows that see it are non-finite
    q, k, v = _inputs(1, 48, 48, 2, 1, 8, 8, dtype=torch.float32)
    cu = torch.tensor([0, 20, 48], dtype=torch.int32)
    for kw, pos, clean_rows in ((dict(k_chunk=16), 40, slice(0, 40)), (dict(cu_seqlens=cu, k_chunk=16), 30, slice(0, 20))):
        o0, l0 = blockwise_attention(q, k, v, causal=True, **kw)
        g0 = _grads(o0, l0, (q, k, v))
        kk, vv = k.detach().clone(), v.detach().clone()
        (kk if where == "k" else vv)[0, pos] = bad
        kk.requires_grad_(), vv.requires_grad_()
        o1, l1 = blockwise_attention(q, kk, vv, causal=True, **kw)
        g1 = _grads(o1, l1, (q, kk, vv))
        assert torch.equal(o1[:, clean_rows], o0[:, clean_rows]) and torch.equal(l1[..., clean_rows], l0[..., clean_rows])
        assert torch.equal(g1[0][:, clean_rows], g0[0][:, clean_rows]), "dq of rows that cannot see the bad key"
        assert not torch.isfinite(o1[:, pos]).all(), "the row that sees the bad entry must show it"
