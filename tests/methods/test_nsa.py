"""NSA: forced blocks and top-k by compressed probability (definition, independent of the executor);
the gated three-branch output and every gradient (gates included) against a float64 oracle built
from dense masks; edges and bad options."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit as ak
from attnkit.core.contract import OptionError
from attnkit.core.oracle import naive_attention

from ..conftest import assert_close64
from ._cases import compare, cu, qkv, rows_as_sets

nsa = ak.methods.nsa


def compressed_dense(q, k, v, block, causal, dtype):
    """Branch 1 by hand: softmax over mean-pooled complete blocks; block c visible iff all its keys are.
    Returns out [B, Tq, Hq, Dv] and the per-head probabilities [B, Hq, Tq, nc]."""
    cd = dtype or q.dtype
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    nc = Tk // block
    if nc == 0:
        return torch.zeros(B, Tq, Hq, v.shape[-1], dtype=cd), torch.zeros(B, Hq, Tq, 0, dtype=cd)
    kc = k[:, : nc * block].to(cd).unflatten(1, (nc, block)).mean(2).repeat_interleave(Hq // Hkv, 2)
    vc = v[:, : nc * block].to(cd).unflatten(1, (nc, block)).mean(2).repeat_interleave(Hq // Hkv, 2)
    s = torch.einsum("bihd,bchd->bhic", q.to(cd), kc) * D ** -0.5
    pos = torch.arange(Tq).view(-1, 1) + Tk - Tq
    last = (torch.arange(nc) + 1) * block - 1
    vis = (last.view(1, -1) <= pos) if causal else torch.ones(Tq, nc, dtype=torch.bool)
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhic,bchd->bihd", p, vc), p


def brute_force_selection(q, k, block, topk, causal):
    B, Tq, Hq, _ = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G, nk = Hq // Hkv, -(-Tk // block)
    _, p = compressed_dense(q.double(), k.double(), k.double(), block, causal, torch.float64)
    rows = []
    for b in range(B):
        for g in range(Hkv):
            score = p[b, g * G : (g + 1) * G].mean(0)  # [Tq, nc]
            for i in range(Tq):
                own = (i + Tk - Tq) // block
                forced = sorted({0, own, max(own - 1, 0)})
                cand = [c for c in range(score.shape[1]) if c not in forced and score[i, c] > 0]
                best = sorted(cand, key=lambda c: -float(score[i, c]))[: max(0, topk - len(forced))]
                rows.append(sorted(forced + best))
    assert nk >= 1
    return rows


@settings(max_examples=15)
@given(tq=st.integers(1, 18), extra=st.integers(0, 8), block=st.integers(1, 5), topk=st.integers(1, 6),
       group=st.sampled_from([1, 3]), causal=st.booleans())
def test_selection_matches_definition(tq, extra, block, topk, group, causal):
    q, k, _ = qkv(2, tq, tq + extra, 2 * group, 2, D=4, dtype=torch.float64, seed=5 * tq + extra)
    sel = nsa.select(q, k, block_size=block, topk=topk, causal=causal)
    assert sel.q_block == 1 and sel.k_block == block and sel.num_heads == 2, "NSA selects per KV group"
    assert rows_as_sets(sel.indices) == brute_force_selection(q, k, block, topk, causal), "NSA rows differ"


def test_first_own_and_previous_blocks_always_selected():
    T, block = 48, 4
    q, k, _ = qkv(1, T, T, 4, 2)
    idx = nsa.select(q, k, block_size=block, topk=1).indices  # topk below the forced count
    own = (torch.arange(T) // block).view(1, 1, T, 1)
    for name, blk in (("first", torch.zeros_like(own)), ("own", own), ("previous", (own - 1).clamp_min(0))):
        assert bool((idx == blk).any(-1).all()), f"NSA lost the {name} block for some query"
    assert int((idx > own).sum()) == 0, "NSA selected a future block"


def nsa_oracle(block, topk, window, causal, sel, present):
    def fn(dtype: Optional[torch.dtype], q, k, v, **gates):
        cd = dtype or q.dtype
        out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=cd)
        if "g_cmp" in present:
            o, _ = compressed_dense(q, k, v, block, causal, dtype)
            out = out + gates["g_cmp"].to(cd).unsqueeze(-1) * o
        if "g_slc" in present:
            o, _ = naive_attention(q, k, v, causal=causal, selection=sel, compute_dtype=dtype)
            out = out + gates["g_slc"].to(cd).unsqueeze(-1) * o
        if "g_swa" in present:
            o, _ = naive_attention(q, k, v, causal=causal, compute_dtype=dtype,
                                   mask=ak.masks.Mask(lambda b, h, i, j: (i - j).abs() < window, "w"))
            out = out + gates["g_swa"].to(cd).unsqueeze(-1) * o
        return out

    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 27, 27, 4, 2), (1, 1, 40, 4, 1), (1, 6, 30, 16, 4), (1, 3, 3, 2, 2)])
@pytest.mark.parametrize("causal", [True, False])
def test_mixed_output_and_all_gradients_equal_oracle(dtype, shape, causal):
    B, Tq, Tk, Hq, Hkv = shape  # ragged T, decode Tq=1, GQA 4, T smaller than one block
    block, topk, window = 4, 3, 5
    q, k, v = qkv(B, Tq, Tk, Hq, Hkv, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    gates = {n: torch.sigmoid(torch.randn(B, Tq, Hq, generator=g, dtype=torch.float64)).to(dtype)
             for n in ("g_cmp", "g_slc", "g_swa")}
    sel = nsa.select(q, k, block_size=block, topk=topk, causal=causal)

    def fn(q, k, v, **gs):
        return ak.attention(q, k, v, method="nsa", causal=causal, block_size=block, topk=topk, window=window, **gs)

    compare(fn, nsa_oracle(block, topk, window, causal, sel, set(gates)), {"q": q, "k": k, "v": v, **gates},
            with_lse=False, label=f"nsa {dtype} {shape} causal={causal}")


@pytest.mark.parametrize("present", [("g_cmp",), ("g_slc",), ("g_swa",), ("g_slc", "g_swa")])
def test_missing_gate_drops_its_branch(present):
    B, T, Hq, Hkv = 1, 21, 2, 1
    q, k, v = qkv(B, T, T, Hq, Hkv, dtype=torch.float64)
    gates = {n: torch.rand(B, T, Hq, dtype=torch.float64) for n in present}
    sel = nsa.select(q, k, block_size=4, topk=2)
    out = ak.attention(q, k, v, method="nsa", block_size=4, topk=2, window=6, **gates)
    ref = nsa_oracle(4, 2, 6, True, sel, set(present))(torch.float64, q, k, v, **gates)
    assert_close64(out, ref, f"nsa with only {present}")


def test_topk_covering_all_blocks_selects_every_causal_block():
    T = 22
    q, k, v = qkv(1, T, T, 2, 2, dtype=torch.float64)
    sel = nsa.select(q, k, block_size=4, topk=6)
    assert ak.methods.inspect.density(sel, T, T) == pytest.approx(1.0, abs=1e-12)
    out = ak.attention(q, k, v, method="nsa", block_size=4, topk=6, g_slc=torch.ones(1, T, 2, dtype=torch.float64))
    dense = ak.attention(q, k, v, method="dense", backend="reference")
    assert_close64(out, dense, "nsa selected branch with topk >= blocks vs dense causal")


def test_varlen_equals_per_sequence_runs():
    lengths = [9, 0, 14]
    T = sum(lengths)
    q, k, v = qkv(1, T, T, 4, 2, dtype=torch.float64)
    gates = {n: torch.rand(1, T, 4, dtype=torch.float64) for n in ("g_cmp", "g_slc", "g_swa")}
    opts = {"block_size": 4, "topk": 2, "window": 3}
    packed = ak.attention(q, k, v, method="nsa", cu_seqlens=cu(lengths), **opts, **gates)
    start = 0
    for L in lengths:
        sl = slice(start, start + L)
        if L:
            one = ak.attention(q[:, sl], k[:, sl], v[:, sl], method="nsa", **opts,
                               **{n: t[:, sl] for n, t in gates.items()})
            assert_close64(packed[:, sl], one, f"nsa varlen sequence at {start} (length {L})")
        start += L


def test_no_lse():
    q, k, v = qkv(1, 8, 8, 2, 2)
    with pytest.raises(ak.AttnkitError, match="^return_lse: method 'nsa'"):
        ak.attention(q, k, v, method="nsa", block_size=4, topk=2, g_slc=torch.ones(1, 8, 2), return_lse=True)


@pytest.mark.parametrize("opts, field", [
    ({"topk": 0}, "topk"),
    ({"block_size": -1}, "block_size"),
    ({"window": 0, "g_swa": torch.ones(1, 8, 2)}, "window"),
    ({"g_slc": torch.ones(1, 8, 3)}, "g_slc"),
    ({"g_cmp": torch.ones(1, 7, 2)}, "g_cmp"),
    ({"g_cmp": torch.ones(8, 2)}, "g_cmp"),
    ({"g_slc": [1.0]}, "g_slc"),
    ({"g_swa": torch.ones(1, 8, 2)}, "window"),  # a window is required with g_swa
    ({}, "g_cmp, g_slc, g_swa"),  # at least one gate
])
def test_invalid_options_raise(opts, field):
    q, k, v = qkv(1, 8, 8, 2, 1)
    base = {"block_size": 4, "topk": 2}
    if not any(n in opts for n in ("g_cmp", "g_slc", "g_swa")) and field != "g_cmp, g_slc, g_swa":
        base["g_slc"] = torch.ones(1, 8, 2)
    with pytest.raises(OptionError, match="^" + field.replace(",", r"\,") + ": (expected|required)"):
        ak.attention(q, k, v, method="nsa", **{**base, **opts})


# --- the compressed branch on FlexAttention (the GPU path), checked on the CPU -----------------


@pytest.fixture
def eager_flex(monkeypatch):
    """FlexAttention's eager path (its math implementation, differentiable). The public entry point
    refuses inputs that require grad on the CPU before dispatching (`_validate_device`), since the
    *compiled* CPU kernel has no backward; the eager path has one, so the test lifts that check."""
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)
    return fa.flex_attention


FLEX_CASES = {  # B, Tq, Tk, Hq, Hkv, block, causal
    "ragged_T_gqa4": (2, 37, 37, 4, 1, 4, True),  # T % block != 0; the first 3 rows see no block
    "decode_Tq1_group1": (1, 1, 37, 4, 4, 4, True),
    "Tq_lt_Tk_gqa2": (1, 9, 50, 4, 2, 4, True),
    "Tq_lt_Tk_noncausal": (1, 9, 50, 4, 4, 4, False),
    "many_flex_blocks": (1, 150, 300, 2, 1, 1, True),  # nc = 300 > 128, several FlexAttention blocks
    "Tq_gt_Tk": (1, 20, 10, 2, 1, 3, True),  # negative positions see nothing
}


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("case", sorted(FLEX_CASES))
def test_compressed_branch_flex_equals_reference(case, eager_flex):
    """`compressed_branch(flex=...)` (pooled keys through FlexAttention with the prefix BlockMask) against
    the reference executor: output, LSE and the gradients of q, k, v (through the pooling and the LSE)."""
    B, Tq, Tk, Hq, Hkv, block, causal = FLEX_CASES[case]
    q, k, v = qkv(B, Tq, Tk, Hq, Hkv, dtype=torch.float32, seed=Tq + Tk)

    def branch(flex):
        def fn(q, k, v):
            out, lse, _ = nsa.compressed_branch(ak.core.contract.validate_attention(q, k, v, causal=causal), block,
                                                flex=flex)
            return out, lse
        return fn

    out, lse = branch(eager_flex)(q, k, v)
    ref_out, ref_lse = branch(False)(q, k, v)
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, Tq)
    empty = torch.isinf(ref_lse)  # rows that see no complete block
    assert torch.equal(torch.isinf(lse), empty) and bool((lse[empty] < 0).all()), f"{case}: -inf rows differ"
    assert bool((out.transpose(1, 2)[empty] == 0).all()), f"{case}: a row that sees nothing must be 0"
    if causal and Tq == Tk:
        assert bool(empty[..., : block - 1].all()), "the first block - 1 rows see no complete block"
    compare(branch(eager_flex), lambda dtype, **t: branch(False)(**t), {"q": q, "k": k, "v": v}, with_lse=True,
            label=f"nsa compressed flex {case}")


@pytest.mark.parametrize("tq,tk,block,causal", [(300, 300, 1, True), (130, 700, 2, True), (1, 900, 3, True),
                                                (400, 260, 1, True), (5, 40, 4, True), (200, 333, 1, False)])
def test_compressed_block_mask_matches_create_block_mask(tq, tk, block, causal):
    """Branch 1's BlockMask, built in O(blocks) from the prefix rule, classifies every (query block, key
    block) as FlexAttention's own `create_block_mask` of the same predicate does (full / partial /
    absent): the compiled kernels trust that structure and run the mask_mod in partial blocks only.
    Its mask_mod is the visibility rule `(c + 1) * block - 1 <= i + tk - tq`."""
    from torch.nn.attention.flex_attention import create_block_mask

    from attnkit.ops._flex import FLEX_BLOCK

    nc = tk // block
    ours = nsa._compressed_block_mask(block, tk, tq, nc, causal, torch.device("cpu"))
    theirs = create_block_mask(ours.mask_mod, 1, 1, tq, nc, device="cpu")

    def classes(bm):
        nq, nk = -(-tq // FLEX_BLOCK), -(-nc // FLEX_BLOCK)
        c = torch.zeros(nq, nk, dtype=torch.int64)
        for i in range(nq):
            c[i, bm.kv_indices[0, 0, i, : int(bm.kv_num_blocks[0, 0, i])].long()] += 1
            c[i, bm.full_kv_indices[0, 0, i, : int(bm.full_kv_num_blocks[0, 0, i])].long()] += 2
        return c

    assert torch.equal(classes(ours), classes(theirs)), "block classes differ from create_block_mask"
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert ours.seq_lengths == (tq, nc)
    i, c = torch.arange(tq).view(-1, 1), torch.arange(nc).view(1, -1)
    want = ((c + 1) * block - 1 <= i + tk - tq) if causal else torch.ones(tq, nc, dtype=torch.bool)
    zero = torch.zeros((), dtype=torch.int64)
    assert torch.equal(ours.mask_mod(zero, zero, i, c).expand(tq, nc), want), "mask_mod is not the visibility rule"


def test_compressed_block_mask_through_compiled_flex_cpu():
    """The BlockMask through compiled FlexAttention (the CPU kernel: inference only, no LSE), which,
    unlike the eager path, skips absent blocks and the mask_mod of full ones: the output equals the
    reference's (several 128-blocks each way, nc = 300 not a multiple of 128, Tq != Tk, GQA 2)."""
    from attnkit.ops._flex import call_compiled, compiled_flex

    block, Tq, Tk = 2, 300, 601
    q, k, v = qkv(1, Tq, Tk, 2, 1, D=16, dtype=torch.float32, seed=3)
    call = ak.core.contract.validate_attention(q, k, v)
    ref, _, _ = nsa.compressed_branch(call, block)
    nc = Tk // block
    kc, vc = (x[:, : nc * block].unflatten(1, (nc, block)).mean(2) for x in (k, v))
    bm = nsa._compressed_block_mask(block, Tk, Tq, nc, True, q.device)
    with torch.no_grad():
        out = call_compiled(compiled_flex(), q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), block_mask=bm,
                            scale=call.scale, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_selection_in_small_tiles_matches_definition(causal, monkeypatch):
    """The selection's multi-tile paths (a first pass for the LSE when one tile does not span every
    column; the streaming top-k merge) against the brute-force definition."""
    q, k, _ = qkv(2, 23, 29, 6, 2, D=4, dtype=torch.float64, seed=11)
    want = brute_force_selection(q, k, 3, 4, causal)
    monkeypatch.setattr(nsa, "tile_sizes", lambda *args, **kw: (5, 2))
    sel = nsa.select(q, k, block_size=3, topk=4, causal=causal)
    assert rows_as_sets(sel.indices) == want, "NSA rows differ with small tiles"
    call = ak.core.contract.validate_attention(q, k, k, causal=causal)
    _, lse, _ = nsa.compressed_branch(call, 3)
    sel = nsa.selection_from_lse(call, 3, 4, lse)
    assert rows_as_sets(sel.indices) == want, "NSA rows differ with small tiles and the branch's LSE"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("small_tiles", [False, True])
def test_bf16_gemm_path_selects_as_float32(causal, small_tiles, monkeypatch, config_override):
    """The CUDA path's score GEMM (bf16 q and compressed keys, scale and -lse in one pass after it),
    forced onto the CPU: the same blocks as the float32 path, fused and multi-tile."""
    q, k, _ = qkv(2, 70, 90, 8, 2, D=16, dtype=torch.bfloat16, seed=4)
    if small_tiles:
        monkeypatch.setattr(nsa, "tile_sizes", lambda *args, **kw: (16, 7))
    plain = nsa.select(q, k, block_size=8, topk=4, causal=causal)
    config_override(half_gemm_devices=("cuda", "cpu"))
    half = nsa.select(q, k, block_size=8, topk=4, causal=causal)
    assert rows_as_sets(half.indices) == rows_as_sets(plain.indices)
    call = ak.core.contract.validate_attention(q, k, k, causal=causal)
    _, lse, _ = nsa.compressed_branch(call, 8)
    assert rows_as_sets(nsa.selection_from_lse(call, 8, 4, lse).indices) == rows_as_sets(plain.indices)
