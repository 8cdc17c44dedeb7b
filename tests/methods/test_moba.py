"""MoBA's selection against its definition (MECHANISMS.md), independent of the executor."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit as ak
from attnkit.core.contract import OptionError

from ._cases import qkv, rows_as_sets


def brute_force(q, k, block, topk, causal):
    """Per (b, h, i): own block + the topk - 1 best other candidate blocks by q . mean(k in block)."""
    B, Tq, Hq, _ = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    nk = -(-Tk // block)
    rows = []
    for b in range(B):
        for h in range(Hq):
            kh = k[b, :, h // (Hq // Hkv)].double()
            means = torch.stack([kh[m * block : (m + 1) * block].mean(0) for m in range(nk)])
            for i in range(Tq):
                p = i + Tk - Tq
                own = p // block
                cand = [m for m in range(nk) if m != own and (not causal or m * block <= p)]
                gate = {m: float(q[b, i, h].double() @ means[m]) for m in cand}
                best = sorted(cand, key=lambda m: -gate[m])[: topk - 1]
                rows.append(sorted([own] + best))
    return rows


@settings(max_examples=15)
@given(tq=st.integers(1, 17), extra=st.integers(0, 9), block=st.integers(1, 6), topk=st.integers(1, 5),
       group=st.sampled_from([1, 2]), causal=st.booleans())
def test_selection_matches_definition(tq, extra, block, topk, group, causal):
    q, k, _ = qkv(2, tq, tq + extra, 2 * group, 2, D=4, dtype=torch.float64, seed=tq + 7 * extra)
    sel = ak.methods.moba.select(q, k, block_size=block, topk=topk, causal=causal)
    assert sel.q_block == 1 and sel.k_block == block and sel.num_heads == 2 * group
    assert rows_as_sets(sel.indices) == brute_force(q, k, block, topk, causal), "MoBA rows differ from brute force"


def test_own_block_always_kept_and_never_a_future_block():
    T, block = 40, 4
    q, k, _ = qkv(1, T, T, 3, 3)
    idx = ak.methods.moba.select(q, k, block_size=block, topk=3).indices  # [1, 3, T, 3]
    own = (torch.arange(T) // block).view(1, 1, T, 1)
    assert bool((idx == own).any(-1).all()), "a query lost its own block"
    assert int((idx > own).sum()) == 0, f"{int((idx > own).sum())} future blocks selected"
    counts = (idx >= 0).sum(-1)
    expected = torch.clamp(torch.arange(T) // block + 1, max=3).view(1, 1, T).expand_as(counts)
    assert torch.equal(counts, expected), "each query should keep min(topk, candidate blocks) blocks"


@pytest.mark.parametrize("bad, field", [({"topk": 0}, "topk"), ({"topk": -2}, "topk"), ({"block_size": 0}, "block_size"),
                                        ({"block_size": True}, "block_size"), ({"topk": 1.5}, "topk")])
def test_invalid_options_raise_naming_the_field(bad, field):
    q, k, v = qkv(1, 8, 8, 2, 2)
    opts = {"block_size": 4, "topk": 2, **bad}
    with pytest.raises(OptionError, match=rf"^{field}: expected"):
        ak.attention(q, k, v, method="moba", **opts)
    with pytest.raises(OptionError, match=rf"^{field}: expected"):
        ak.methods.moba.select(q, k, **opts)


def test_missing_and_unknown_options_raise():
    q, k, v = qkv(1, 8, 8, 2, 2)
    with pytest.raises(OptionError, match="topk: required"):
        ak.attention(q, k, v, method="moba", block_size=4)
    with pytest.raises(OptionError, match="window: not an option"):
        ak.attention(q, k, v, method="moba", block_size=4, topk=2, window=3)


def test_no_gradient_through_the_selection():
    q, k, v = qkv(1, 12, 12, 2, 1)
    q.requires_grad_(True)
    sel = ak.methods.moba.select(q, k, block_size=4, topk=2)
    assert not sel.indices.requires_grad and sel.indices.dtype == torch.int32


@pytest.mark.parametrize("causal", [True, False])
def test_split_half_gate_gemm_selects_as_float32(config_override, causal):
    """The CUDA path's gate GEMM (half q, block means split into three half terms) is the float32
    score: forced onto the CPU here, it selects what the float32 path selects."""
    import attnkit.methods.moba as moba

    q, k, _ = qkv(2, 45, 70, 8, 2, D=16, dtype=torch.bfloat16, seed=3)
    plain = moba.select(q, k, block_size=8, topk=4, causal=causal)
    config_override(half_gemm_devices=("cuda", "cpu"))
    split = moba.select(q, k, block_size=8, topk=4, causal=causal)
    assert torch.equal(plain.indices, split.indices)
    assert rows_as_sets(split.indices) == brute_force(q, k, 8, 4, causal)


def test_split_half_terms_carry_float32():
    from attnkit.methods.gemm import split_half

    x = torch.randn(1000, dtype=torch.float32) * 10.0 ** torch.randint(-3, 4, (1000,))
    parts = split_half(x, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in parts)
    back = sum(p.double() for p in parts)
    assert ((back - x.double()).abs() <= x.double().abs() * 2.0 ** -22).all()
    assert not ((parts[0].double() - x.double()).abs() <= x.double().abs() * 2.0 ** -22).all()  # one term is not enough


def test_nan_key_in_a_future_block_changes_no_earlier_query_and_a_nan_query_stays_nan():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 64, 2, 8, generator=g) for _ in range(3))
    o0, l0 = ak.attention(q, k, v, "moba", block_size=8, topk=2, return_lse=True)
    kk = k.clone()
    kk[0, 50] = float("nan")  # block 6: a future block for every query before position 48
    o1 = ak.attention(q, kk, v, "moba", block_size=8, topk=2)
    assert torch.equal(o1[:, :48], o0[:, :48])
    qq = q.clone()
    qq[0, 20, 1] = float("nan")
    o2, l2 = ak.attention(qq, k, v, "moba", block_size=8, topk=2, return_lse=True)
    assert torch.isnan(o2[0, 20, 1]).all() and torch.isnan(l2[0, 1, 20]), "a diverged query must show, not vanish"
    assert torch.equal(o2[0, :20], o0[0, :20])
