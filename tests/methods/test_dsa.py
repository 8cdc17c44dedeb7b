"""DSA: the streaming selection equals a brute-force lightning indexer + `torch.topk`; the indexer loss
equals its definition; bad indexer inputs raise."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit as ak
from attnkit.core.contract import AttnkitError, OptionError
from attnkit.core.selection import KVSelection

from ._cases import compare, indexer_inputs, qkv, selection_oracle

dsa = ak.methods.dsa


def indexer_scores(q_idx, k_idx, w):
    """Dense `I [B, Tq, Tk]` (tests only)."""
    return torch.einsum("bth,bths->bts", w, torch.relu(torch.einsum("bthd,bsd->bths", q_idx, k_idx)))


def check_topk_rows(sel_idx, scores, visible, topk, label):
    """Each row holds min(topk, #visible) distinct visible keys whose scores are the top values;
    where the k-th and (k+1)-th scores differ, the key sets are equal."""
    B, Tq, Tk = scores.shape
    s = scores.masked_fill(~visible, float("-inf"))
    for b in range(B):
        for i in range(Tq):
            got = sorted(x for x in sel_idx[b, 0, i].tolist() if x >= 0)
            n = min(topk, int(visible[b, i].sum()))
            assert len(got) == n == len(set(got)), f"{label} row {i}: {len(got)} keys, expected {n} distinct"
            assert all(bool(visible[b, i, j]) for j in got), f"{label} row {i}: selects an invisible key"
            want_v, want_i = s[b, i].topk(n)
            got_v = s[b, i, got].sort(descending=True).values
            assert torch.allclose(got_v, want_v, rtol=0, atol=1e-12), f"{label} row {i}: top values differ"
            if n < int(visible[b, i].sum()) and n > 0 and float(s[b, i].sort(descending=True).values[n]) < float(want_v[-1]):
                assert got == sorted(want_i.tolist()), f"{label} row {i}: key set differs from torch.topk"


@settings(max_examples=15)
@given(tq=st.integers(1, 20), extra=st.integers(0, 10), topk=st.integers(1, 12), causal=st.booleans())
def test_selection_equals_brute_force_topk(tq, extra, topk, causal):
    tk = tq + extra
    q, k, _ = qkv(2, tq, tk, 2, 1, D=4, dtype=torch.float64)
    ind = indexer_inputs(2, tq, tk, hi=3, di=5, dtype=torch.float64, seed=tq * 13 + extra)
    sel = dsa.select(q, k, topk=topk, causal=causal, **ind)
    assert sel.q_block == 1 and sel.k_block == 1 and sel.num_heads == 1 and sel.width == min(topk, tk)
    i = torch.arange(tq).view(1, -1, 1) + tk - tq
    visible = (torch.arange(tk).view(1, 1, -1) <= i) if causal else torch.ones(1, tq, tk, dtype=torch.bool)
    check_topk_rows(sel.indices, indexer_scores(**ind), visible.expand(2, -1, -1), topk, "dsa")


def test_small_tiles_still_give_the_top_k(monkeypatch):
    # force tiny tiles so the streaming merge runs over many row and key chunks
    T = 64
    q, k, _ = qkv(1, T, T, 2, 2, dtype=torch.float64)
    ind = indexer_inputs(1, T, T, hi=4, di=8, dtype=torch.float64, seed=3)
    monkeypatch.setattr(dsa, "tile_sizes", lambda *a, **kw: (5, 7))
    sel = dsa.select(q, k, topk=9, **ind)
    visible = (torch.arange(T).view(1, 1, -1) <= torch.arange(T).view(1, -1, 1))
    check_topk_rows(sel.indices, indexer_scores(**ind), visible, 9, "dsa (5 x 7 tiles)")


def brute_force_loss(q, k, ind, sel, scale, causal=True):
    """sum_i KL(p_i || softmax(I[i, S_i])) with p_i the head-mean of per-head softmax over S_i."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    I = indexer_scores(**ind)
    total = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        for i in range(Tq):
            S = [j for j in sel.indices[b, 0, i].tolist() if j >= 0 and (not causal or j <= i + Tk - Tq)]
            if not S:
                continue
            target = torch.zeros(len(S), dtype=torch.float64)
            for h in range(Hq):
                logits = torch.stack([q[b, i, h] @ k[b, j, h // (Hq // Hkv)] for j in S]) * scale
                target += torch.softmax(logits, 0)
            target /= Hq
            log_q = torch.log_softmax(I[b, i, S], 0)
            total = total + (target * (target.log() - log_q)).sum()
    return total


@pytest.mark.parametrize("tq, tk", [(11, 11), (3, 14)])
def test_indexer_loss_matches_definition_and_trains_only_the_indexer(tq, tk):
    q, k, _ = qkv(1, tq, tk, 4, 2, D=4, dtype=torch.float64)
    ind = {n: t.requires_grad_(True) for n, t in indexer_inputs(1, tq, tk, dtype=torch.float64).items()}
    q.requires_grad_(True)
    loss = dsa.indexer_loss(q, k, topk=4, **ind)
    sel = dsa.select(q, k, topk=4, **{n: t.detach() for n, t in ind.items()})
    want = brute_force_loss(q.detach(), k, {n: t.detach() for n, t in ind.items()}, sel, 4 ** -0.5)
    lv = float(loss.detach())
    assert abs(lv - float(want)) <= 1e-10 * max(1.0, abs(float(want))), f"loss {lv} != brute force {float(want)}"
    assert lv > 0, "random indexer should not match the attention distribution exactly"
    loss.backward()
    assert q.grad is None, "indexer loss must not send gradients to the attention query"
    for n, t in ind.items():
        assert t.grad is not None and bool(t.grad.abs().sum() > 0), f"no gradient reached {n}"
    mean = dsa.indexer_loss(q, k, topk=4, reduction="mean", **{n: t.detach() for n, t in ind.items()})
    assert abs(float(mean) * tq - float(want)) <= 1e-9 * max(1.0, abs(float(want))), "mean != sum / queries"


def test_indexer_loss_gradcheck_in_w():
    q, k, _ = qkv(1, 6, 6, 2, 1, D=4, dtype=torch.float64)
    ind = indexer_inputs(1, 6, 6, dtype=torch.float64)
    sel = dsa.select(q, k, topk=3, **ind)
    w = ind.pop("w").requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w_: dsa.indexer_loss(q, k, w=w_, selection=sel, **ind), (w,))


def test_indexer_loss_is_zero_when_the_indexer_matches_attention():
    # one key visible per query (topk = 1): both distributions are a point mass
    q, k, _ = qkv(1, 7, 7, 2, 2, dtype=torch.float64)
    loss = dsa.indexer_loss(q, k, topk=1, **indexer_inputs(1, 7, 7, dtype=torch.float64))
    assert abs(float(loss)) < 1e-12, f"KL of identical point masses should be 0, got {float(loss)}"


def test_indexer_loss_varlen_equals_per_sequence_sum():
    lengths = [5, 9]
    T = sum(lengths)
    q, k, _ = qkv(1, T, T, 2, 1, dtype=torch.float64)
    ind = indexer_inputs(1, T, T, dtype=torch.float64)
    cs = torch.tensor([0, 5, 14], dtype=torch.int32)
    packed = dsa.indexer_loss(q, k, topk=3, cu_seqlens=cs, **ind)
    parts = sum(float(dsa.indexer_loss(q[:, s], k[:, s], topk=3, **{n: t[:, s] for n, t in ind.items()}))
                for s in (slice(0, 5), slice(5, 14)))
    assert abs(float(packed) - parts) < 1e-10, f"varlen loss {float(packed)} != per-sequence sum {parts}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_oracle_with_gradients(dtype):
    q, k, v = qkv(1, 19, 19, 4, 1, dtype=dtype)
    ind = indexer_inputs(1, 19, 19, dtype=dtype)
    sel = dsa.select(q, k, topk=5, **ind)

    def fn(q, k, v):
        return ak.attention(q, k, v, method="dsa", topk=5, return_lse=True, **ind)

    compare(fn, selection_oracle(sel, True), {"q": q, "k": k, "v": v}, with_lse=True, label=f"dsa {dtype}")


def _bad(B, T, **override):
    ind = indexer_inputs(B, T, T)
    ind.update(override)
    return ind


@pytest.mark.parametrize("override, field", [
    ({"q_idx": torch.randn(1, 8, 3)}, "q_idx"),
    ({"q_idx": torch.randn(1, 7, 3, 8)}, "q_idx"),
    ({"k_idx": torch.randn(1, 8, 5)}, "k_idx"),
    ({"w": torch.randn(1, 8, 2)}, "w"),
    ({"w": torch.ones(1, 8, 3, dtype=torch.int64)}, "w"),
    ({"k_idx": None}, "k_idx"),
])
def test_invalid_indexer_inputs_raise(override, field):
    q, k, v = qkv(1, 8, 8, 2, 2)
    with pytest.raises(OptionError, match=rf"^{field}: expected"):
        ak.attention(q, k, v, method="dsa", topk=2, **_bad(1, 8, **override))


def test_invalid_topk_and_selection_raise():
    q, k, v = qkv(1, 8, 8, 2, 2)
    with pytest.raises(OptionError, match="^topk: expected"):
        dsa.select(q, k, topk=0, **indexer_inputs(1, 8, 8))
    with pytest.raises(AttnkitError, match="^topk: required"):
        dsa.indexer_loss(q, k, **indexer_inputs(1, 8, 8))
    block_sel = KVSelection(torch.zeros(1, 1, 2, 1, dtype=torch.int32), q_block=4, k_block=4)
    with pytest.raises(AttnkitError, match="^selection: expected a token-level"):
        dsa.indexer_loss(q, k, selection=block_sel, **indexer_inputs(1, 8, 8))
