"""The windowed key-major path of the Triton sparse executor (`kernels.sparse.keymajor_windowed`)
against the float64 reference executor, by the 2x rule of DESIGN.md section 7 (outputs, LSE,
dq / dk / dv, and the gradient through the LSE), and its counting-sort entry list against the
sorted one of `kernels.sparse.keymajor`.

Tiny shapes run in Triton's CPU interpreter with windows of a few tokens, so every call spans
several windows and the persistent programs stride over several work items; `@pytest.mark.gpu`
repeats the check at a real size with the default window.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import attnkit as ak
from attnkit.core.selection import KVSelection

from .helpers import check_sparse, random_selection
from .test_sparse_keymajor import GPU_CASES, TINY


@pytest.fixture
def windowed(kernel_device, config_override):
    """The windowed variant selected: its module (`.mod`) and its calls since the test began
    (`.calls()`). The kernels are loaded first: importing the module directly would build its
    kernels outside the interpreter."""
    from attnkit import kernels

    kw = kernels.load().keymajor_windowed
    config_override(sparse_keymajor=True, sparse_keymajor_variant="windowed")
    before = dict(kw.STATS)
    return SimpleNamespace(mod=kw, calls=lambda: {k: kw.STATS[k] - before[k] for k in before})


@pytest.mark.parametrize("case", sorted(TINY))
def test_windowed_tiny(case, kernel_device, windowed, monkeypatch):
    monkeypatch.setattr(windowed.mod, "WINDOW", 8)
    monkeypatch.setattr(windowed.mod, "BWD_WINDOW", 8)
    kw = dict(TINY[case])
    kw.setdefault("q_block", 1)
    check_sparse(device=kernel_device, **kw)
    assert windowed.calls() == {"fwd": 1, "bwd": 1}


@pytest.mark.parametrize("window", [0, 5, 16, 4096])
def test_windowed_window_sizes(window, kernel_device, windowed, monkeypatch):
    """One window per sequence (0), windows not a multiple of anything, one window per key block,
    a window longer than the sequence."""
    monkeypatch.setattr(windowed.mod, "WINDOW", window)
    monkeypatch.setattr(windowed.mod, "BWD_WINDOW", window)
    check_sparse(device=kernel_device, Tq=43, Tk=43, Hq=4, Hkv=1, Hsel=4, D=16, q_block=1, k_block=16, width=2)
    assert windowed.calls() == {"fwd": 1, "bwd": 1}


def test_windowed_chunks_and_key_subtiles(kernel_device, windowed, monkeypatch):
    """Small launch knobs: a cell's entries span several work items and several BLOCK_M steps, a key
    block (k_block 24 / 40) spans several key tiles, one program strides over many work items."""
    for name, val in (("ENTRY_CHUNK", 32), ("FWD_BLOCK_M", 16), ("BWD_BLOCK_M", 16), ("FWD_MAX_BLOCK_N", 16),
                      ("BWD_MAX_BLOCK_N", 16), ("WINDOW", 12), ("BWD_WINDOW", 20), ("COUNT_BLOCK", 64),
                      ("INTERPRETER_PROGRAMS", 2)):
        monkeypatch.setattr(windowed.mod, name, val)
    check_sparse(device=kernel_device, Tq=45, Tk=45, Hq=4, Hkv=1, Hsel=4, D=16, q_block=1, k_block=24, width=2,
                 dtype=torch.float32)
    check_sparse(device=kernel_device, Tq=30, Tk=81, Hq=2, Hkv=2, Hsel=2, D=16, q_block=1, k_block=40, width=2)
    assert windowed.calls() == {"fwd": 2, "bwd": 2}


@pytest.mark.parametrize("width", [3, 0])
def test_windowed_all_rows_empty(width, kernel_device, windowed):
    """A per-head selection with no key at all (all -1, or rows of width 0): out 0, lse -inf, zero
    gradients."""
    q = torch.randn(1, 20, 2, 16, device=kernel_device, requires_grad=True)
    k = torch.randn(1, 20, 1, 16, device=kernel_device, requires_grad=True)
    v = torch.randn(1, 20, 1, 16, device=kernel_device, requires_grad=True)
    sel = KVSelection(torch.full((1, 2, 20, width), -1, dtype=torch.int32, device=kernel_device), 1, 16)
    out, lse = ak.ops.sparse_attention(q, k, v, sel, return_lse=True, backend="triton")
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    (out.sum() + torch.where(torch.isinf(lse), 0, lse).sum()).backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))
    assert windowed.calls() == {"fwd": 1, "bwd": 1}


@pytest.mark.parametrize("causal", [True, False])
def test_counting_entries_match_sorted(causal, kernel_device, windowed):
    """With one window, the counting build lists exactly the sorted build's entries per cell (the
    order inside a cell may differ); with windows, each entry lands in the cell of its token's window."""
    from attnkit import kernels

    keymajor = kernels.load().keymajor
    g = torch.Generator().manual_seed(3)
    n, hq, hkv, tq, k_block = 2, 4, 2, 37, 16
    sel = random_selection(n, hq, tq, tq, 1, k_block, 3, kernel_device, generator=g).indices
    cu = torch.arange(0, (n + 1) * tq, tq, dtype=torch.int32, device=kernel_device)
    cu[1] = 30  # sequences of 30 and 44 tokens: some selected blocks lie past the first one's keys
    nkb = (44 + k_block - 1) // k_block
    sel = torch.cat([sel, sel[:, :, :7]], 2)  # Tpad = 44
    ref = keymajor.build_entries(sel, cu, cu, hq, hkv, 1, k_block, nkb, causal, 32, 1)
    got = windowed.mod.build_entries(sel, cu, cu, hq, hkv, 1, k_block, nkb, causal, 32, 1, 0)
    assert got.cells == ref.cells and torch.equal(got.off, ref.off), (got.off, ref.off)
    assert torch.equal(got.woff, ref.woff)
    total = int(ref.off[-1])
    for c in range(ref.cells):
        a, b = int(ref.off[c]), int(ref.off[c + 1])
        assert torch.equal(got.order[a:b].long().sort().values, ref.order[a:b].long().sort().values), f"cell {c}"
    assert total > 0
    win = 8
    wgot = windowed.mod.build_entries(sel, cu, cu, hq, hkv, 1, k_block, nkb, causal, 32, 1, win)
    assert int(wgot.off[-1]) == total
    cells_per_win = n * hkv * nkb
    for c in range(wgot.cells):
        a, b = int(wgot.off[c]), int(wgot.off[c + 1])
        tok = (wgot.order[a:b].long() // (sel.shape[-1] * hq)) % sel.shape[2]
        assert bool((tok // win == c // cells_per_win).all()), f"cell {c}: tokens {tok.tolist()}"


def test_windowed_moba_ties(kernel_device, windowed, monkeypatch):
    """MoBA's own selection on keys whose blocks all have the same mean (every gate ties, so the
    selection is decided by the tie-break), T not a multiple of the block, through the windowed
    kernels against the reference: outputs and LSE by the 2x rule."""
    from tests.conftest import assert_close_rule

    monkeypatch.setattr(windowed.mod, "WINDOW", 8)
    g = torch.Generator().manual_seed(5)
    bs, t, hq, hkv, d = 16, 61, 4, 1, 16
    base = torch.randint(-4, 5, (bs, hkv, d), generator=g).float() / 4
    perms = [torch.randperm(bs, generator=g) for _ in range((t + bs - 1) // bs)]
    k = torch.cat([base[p] for p in perms])[:t].unsqueeze(0).to(kernel_device, torch.bfloat16)
    k[:, (t // bs) * bs:] = 0  # the last, partial block: mean 0, ties with nothing else
    q = torch.randn(1, t, hq, d, generator=g).to(kernel_device, torch.bfloat16)
    v = torch.randn(1, t, hkv, d, generator=g).to(kernel_device, torch.bfloat16)
    sel = ak.methods.moba.select(q, k, block_size=bs, topk=2)
    out, lse = ak.ops.sparse_attention(q, k, v, sel, return_lse=True, backend="triton")
    ref = ak.ops.sparse_attention(q.double(), k.double(), v.double(), sel, return_lse=True, backend="reference")
    base_ = ak.ops.sparse_attention(q.float(), k.float(), v.float(), sel, return_lse=True, backend="reference")
    assert_close_rule(out, ref[0], base_[0].to(q.dtype), "windowed moba ties out")
    assert_close_rule(lse, ref[1], base_[1], "windowed moba ties lse")
    assert windowed.calls()["fwd"] == 1


def test_setting_picks_the_variant(kernel_device, config_override):
    """`sparse_keymajor_variant` switches the key-major path between the modules; an unknown value
    is an error naming the setting."""
    from attnkit import kernels

    mod = kernels.load()
    stats = (mod.keymajor.STATS, mod.keymajor_windowed.STATS, mod.keymajor_onepass.STATS)
    kw = dict(Tq=9, Tk=9, Hq=2, Hkv=1, Hsel=2, D=16, q_block=1, k_block=16, width=1, backward=False)
    for variant, want in (("sorted", (1, 0, 0)), ("windowed", (0, 1, 0)), ("onepass", (0, 0, 1))):
        config_override(sparse_keymajor=True, sparse_keymajor_variant=variant)
        before = [st["fwd"] for st in stats]
        check_sparse(device=kernel_device, **kw)
        got = tuple(st["fwd"] - b for st, b in zip(stats, before))
        assert got == want, (variant, got)
    config_override(sparse_keymajor_variant="fast")
    with pytest.raises(ak.AttnkitError, match="sparse_keymajor_variant"):
        check_sparse(device=kernel_device, **kw)


# --- real size on a GPU ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_windowed_gpu(case, gpu, windowed):
    check_sparse(device=gpu, chunk=256, **GPU_CASES[case])
    assert windowed.calls() == {"fwd": 1, "bwd": 1}


@pytest.mark.gpu
def test_windowed_moba_selection_gpu(gpu, windowed):
    """MoBA's own selection (`methods.moba.select`) through the windowed kernels vs the reference,
    at a length that spans several windows."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4096, h, 128, generator=g).to(gpu, torch.bfloat16) for h in (16, 2, 2))
    sel = ak.methods.moba.select(q, k, block_size=64, topk=8)
    out = ak.ops.sparse_attention(q, k, v, sel, backend="triton")
    ref = ak.ops.sparse_attention(q.double(), k.double(), v.double(), sel, backend="reference")
    base = ak.ops.sparse_attention(q.float(), k.float(), v.float(), sel, backend="reference").to(q.dtype)
    from tests.conftest import assert_close_rule

    assert_close_rule(out, ref, base, "moba windowed out")
    assert windowed.calls()["fwd"] == 1
