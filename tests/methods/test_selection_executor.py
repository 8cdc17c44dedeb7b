"""MoBA, DSA, block top-k, PowerAttention, Stochastic Attention through `attnkit.attention`: each equals
the float64 oracle run with the same selection as a dense mask (outputs, LSE, gradients), plus the
edges of issue 3 (dense limit, ragged T, T below one block, decode, GQA, varlen)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit as ak
from attnkit.core.oracle import naive_attention

from ..conftest import assert_close64
from ._cases import SELECTION_METHODS, compare, cu, dense_causal_equal, options, qkv, rows_as_sets, select, selection_oracle


def _refuses_non_causal(method, causal, q, k, v, opts) -> bool:
    """A causal-only method (the training-free prefill methods) must refuse causal=False by name."""
    if causal or ak.registry.get_method(method).capabilities.non_causal:
        return False
    with pytest.raises(ak.AttnkitError, match="^causal: method .* is causal only"):
        ak.attention(q, k, v, method=method, causal=False, **opts)
    return True


def _attention(method, opts, causal, cu_seqlens=None):
    def fn(q, k, v):
        return ak.attention(q, k, v, method=method, causal=causal, cu_seqlens=cu_seqlens, return_lse=True, **opts)

    return fn


@pytest.mark.parametrize("method", SELECTION_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [True, False])
def test_equals_oracle_with_same_selection(method, dtype, causal):
    # T = 37 is not a multiple of block_size 8; GQA group 2
    B, T, Hq, Hkv = 2, 37, 4, 2
    q, k, v = qkv(B, T, T, Hq, Hkv, dtype=dtype)
    opts = options(method, B, T, T, dtype, block_size=8, topk=2)
    if _refuses_non_causal(method, causal, q, k, v, opts):
        return
    sel = select(method, q, k, opts, causal=causal)
    compare(_attention(method, opts, causal), selection_oracle(sel, causal), {"q": q, "k": k, "v": v},
            with_lse=True, label=f"{method} {dtype} causal={causal}")


@pytest.mark.parametrize("method", SELECTION_METHODS)
@pytest.mark.parametrize("tq", [1, 5])
def test_decode_shape_tq_small_against_long_keys(method, tq):
    B, Tk, Hq, Hkv = 1, 64, 4, 1
    q, k, v = qkv(B, tq, Tk, Hq, Hkv)
    opts = options(method, B, tq, Tk, torch.float32, block_size=8, topk=3)
    sel = select(method, q, k, opts)
    compare(_attention(method, opts, True), selection_oracle(sel, True), {"q": q, "k": k, "v": v},
            with_lse=True, label=f"{method} Tq={tq} Tk={Tk}")


@pytest.mark.parametrize("method", SELECTION_METHODS)
@pytest.mark.parametrize("hkv", [16, 4, 1])
def test_gqa_group_sizes(method, hkv):
    B, T, Hq = 1, 20, 16
    q, k, v = qkv(B, T, T, Hq, hkv, D=4)
    opts = options(method, B, T, T, torch.float32, block_size=4, topk=2)
    sel = select(method, q, k, opts)
    compare(_attention(method, opts, True), selection_oracle(sel, True), {"q": q, "k": k, "v": v},
            with_lse=True, label=f"{method} group {Hq // hkv}")


def _dense_limit_options(method, B, T):
    if method == "dsa":
        return options("dsa", B, T, T, torch.float64, topk=T)  # topk >= T
    if method == "stochastic":
        return {"window": T, "seed": 5}  # a window as long as the sequence
    if method == "power":
        return {"block_size": T + 3}  # one block
    return options(method, B, T, T, torch.float64, block_size=3, topk=T)  # topk >= number of blocks


@pytest.mark.parametrize("method", SELECTION_METHODS)
@pytest.mark.parametrize("T", [4, 23])
def test_topk_covering_all_blocks_is_dense_causal(method, T):
    # T = 4 with block_size 3 / T + 3 also covers "T smaller than one block" for power
    q, k, v = qkv(2, T, T, 4, 2, dtype=torch.float64)
    opts = _dense_limit_options(method, 2, T)
    out, lse = ak.attention(q, k, v, method=method, return_lse=True, **opts)
    ref, ref_lse = ak.attention(q, k, v, method="dense", backend="reference", return_lse=True)
    dense_causal_equal(out, ref, f"{method} output")
    dense_causal_equal(lse, ref_lse, f"{method} lse")
    assert ak.methods.inspect.density(select(method, q, k, opts), T, T) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("method", ["moba", "block_topk", "power"])
def test_sequence_shorter_than_one_block_is_dense_causal(method):
    T = 5
    q, k, v = qkv(1, T, T, 2, 2, dtype=torch.float64)
    opts = options(method, 1, T, T, torch.float64, block_size=8, topk=1)
    out = ak.attention(q, k, v, method=method, **opts)
    ref = ak.attention(q, k, v, method="dense", backend="reference")
    dense_causal_equal(out, ref, f"{method} T={T} < block 8")


@pytest.mark.parametrize("method", SELECTION_METHODS)
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_equals_per_sequence_runs(method, causal):
    lengths = [13, 0, 1, 22]
    cs = cu(lengths)
    T = sum(lengths)
    q, k, v = qkv(1, T, T, 4, 2, dtype=torch.float64)
    opts = options(method, 1, T, T, torch.float64, block_size=4, topk=2)
    if _refuses_non_causal(method, causal, q, k, v, opts):
        return
    if method == "dsa":  # per-sequence slices of the indexer inputs
        ind = {n: opts.pop(n) for n in ("q_idx", "k_idx", "w")}
    packed = ak.attention(q, k, v, method=method, causal=causal, cu_seqlens=cs, return_lse=True,
                          **opts, **(ind if method == "dsa" else {}))
    sel_packed = select(method, q, k, {**opts, **(ind if method == "dsa" else {})}, causal=causal, cu_seqlens=cs)
    start = 0
    for n, L in enumerate(lengths):
        if L == 0:
            continue
        sl = slice(start, start + L)
        extra = {name: t[:, sl] for name, t in ind.items()} if method == "dsa" else {}
        o, l = ak.attention(q[:, sl], k[:, sl], v[:, sl], method=method, causal=causal, return_lse=True,
                            **opts, **extra)
        assert_close64(packed[0][:, sl], o, f"{method} varlen seq {n} output")
        assert_close64(packed[1][:, :, sl], l, f"{method} varlen seq {n} lse")
        sel_one = select(method, q[:, sl], k[:, sl], {**opts, **extra}, causal=causal)
        rows = sel_one.indices.shape[2]
        got = rows_as_sets(sel_packed.indices[n : n + 1, :, :rows])
        want = rows_as_sets(sel_one.indices)
        assert got == want, f"{method} varlen seq {n}: packed selection rows differ from the per-sequence run"
        start += L


@settings(max_examples=12)
@given(
    method=st.sampled_from(SELECTION_METHODS),
    tq=st.integers(1, 19),
    extra_k=st.integers(0, 12),
    hkv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]),
    block=st.integers(1, 7),
    topk=st.integers(1, 6),
    causal=st.booleans(),
)
def test_property_forward_equals_oracle(method, tq, extra_k, hkv, group, block, topk, causal):
    tk = tq + extra_k
    q, k, v = qkv(1, tq, tk, hkv * group, hkv, D=4, dtype=torch.float64, seed=tq * 31 + tk)
    opts = options(method, 1, tq, tk, torch.float64, block_size=block, topk=topk)
    if _refuses_non_causal(method, causal, q, k, v, opts):
        return
    sel = select(method, q, k, opts, causal=causal)
    idx = sel.indices
    valid = idx[idx >= 0]
    assert valid.numel() == 0 or int(valid.max()) < -(-tk // sel.k_block), f"{method}: block id past the keys"
    out, lse = ak.attention(q, k, v, method=method, causal=causal, return_lse=True, **opts)
    ref, ref_lse = naive_attention(q, k, v, causal=causal, selection=sel)
    assert_close64(out, ref, f"{method} output")
    assert_close64(lse, ref_lse, f"{method} lse")
    d = ak.methods.inspect.density(sel, tq, tk, causal=causal)
    assert 0.0 <= d <= 1.0 + 1e-12, f"{method}: density {d} outside [0, 1]"


def test_all_six_registered_with_reference_and_gpu_backends():
    rows = {r["name"]: r for r in ak.list_methods()}
    expected_backends = {"block_topk": ["triton", "flex", "reference"]}
    for name in ("moba", "nsa", "dsa", "block_topk", "power", "stochastic"):
        assert name in rows, f"{name} is not registered"
        want = expected_backends.get(name, ["triton", "reference"])
        assert rows[name]["backends"] == want, f"{name}: backends {rows[name]['backends']}, expected {want}"
        caps = rows[name]["capabilities"]
        expected_lse = name != "nsa"
        assert caps["lse"] is expected_lse, f"{name}: lse capability {caps['lse']}, expected {expected_lse}"
        for cap in ("causal", "non_causal", "gqa", "varlen", "backward", "decode"):
            assert caps[cap], f"{name}: capability {cap} is False"
        assert rows[name]["docs"] == f"docs/methods/{name}.md"
