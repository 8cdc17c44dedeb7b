"""The key-major path of the Triton sparse executor (`kernels.sparse.keymajor`) against the float64
reference executor, by the 2x rule of DESIGN.md section 7 (outputs, LSE, dq / dk / dv, and the
gradient through the LSE).

The path serves per-token selections with few query heads per selection row (MoBA: `q_block == 1`,
`Hsel == Hq`). Tiny shapes run in Triton's CPU interpreter; `@pytest.mark.gpu` repeats the check
at a real size. Random rows are duplicate-free with -1 entries and empty rows (`helpers`).
"""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.core.selection import KVSelection

from .helpers import check_sparse

# (name, shape kwargs): T never a multiple of the block, GQA 1 / 4 / 16, Tq = 1, Tq != Tk, varlen
TINY = {
    "mha_bf16": dict(Tq=37, Tk=37, Hq=2, Hkv=2, Hsel=2, D=16, k_block=16, width=2),
    "gqa4_fp32_dv32": dict(Tq=29, Tk=29, Hq=4, Hkv=1, Hsel=4, D=16, Dv=32, k_block=16, width=2,
                           dtype=torch.float32),
    "gqa16_bf16": dict(Tq=21, Tk=21, Hq=16, Hkv=1, Hsel=16, D=16, k_block=16, width=2),
    "batch2_fp16": dict(B=2, Tq=19, Tk=19, Hq=4, Hkv=2, Hsel=4, D=32, k_block=16, width=2, dtype=torch.float16),
    "decode_tq1": dict(Tq=1, Tk=45, Hq=4, Hkv=2, Hsel=4, D=16, k_block=16, width=3, empty_frac=0.0),
    "decode_tq1_fp32": dict(Tq=1, Tk=50, Hq=8, Hkv=2, Hsel=8, D=16, k_block=16, width=4, dtype=torch.float32),
    "tq_ne_tk_kblock24": dict(Tq=13, Tk=41, Hq=2, Hkv=1, Hsel=2, D=16, k_block=24, width=2),
    "noncausal_fp32": dict(Tq=18, Tk=33, Hq=4, Hkv=4, Hsel=4, D=16, k_block=16, width=2, causal=False,
                           dtype=torch.float32),
    "varlen_gqa2": dict(Tq=40, Tk=40, Hq=4, Hkv=2, Hsel=4, D=16, k_block=16, width=2,
                        cu_seqlens=torch.tensor([0, 17, 17, 40], dtype=torch.int32)),
    # other layouts that put < 8 heads on a token-mode tile also run key-major
    "hsel_hkv_gqa4": dict(Tq=23, Tk=23, Hq=8, Hkv=2, Hsel=2, D=16, k_block=16, width=2),
    "hsel1_gqa2": dict(Tq=23, Tk=23, Hq=4, Hkv=2, Hsel=1, D=16, k_block=16, width=2),
    "qblock3": dict(Tq=25, Tk=25, Hq=2, Hkv=1, Hsel=2, D=16, q_block=3, k_block=16, width=2),
}


@pytest.fixture
def stats(kernel_device):
    """Calls of the key-major path since the test began (the kernels are loaded first: importing the
    module directly would build its kernels outside the interpreter)."""
    from attnkit import kernels

    km = kernels.load().keymajor
    before = dict(km.STATS)
    return lambda: {k: km.STATS[k] - before[k] for k in before}


@pytest.mark.parametrize("case", sorted(TINY))
def test_keymajor_tiny(case, kernel_device, stats, monkeypatch, config_override):
    config_override(sparse_keymajor=True)
    kw = dict(TINY[case])
    kw.setdefault("q_block", 1)
    check_sparse(device=kernel_device, **kw)
    assert stats() == {"fwd": 1, "bwd": 1}


def test_keymajor_chunks_and_key_subtiles(kernel_device, stats, monkeypatch, config_override):
    """Small launch knobs: a cell's entries span several programs and several BLOCK_M steps, and a
    key block (k_block 24 / 40) spans several key tiles."""
    from attnkit import kernels

    km = kernels.load().keymajor
    config_override(sparse_keymajor=True)
    for name, val in (("ENTRY_CHUNK", 32), ("FWD_BLOCK_M", 16), ("BWD_BLOCK_M", 16), ("FWD_MAX_BLOCK_N", 16),
                      ("BWD_MAX_BLOCK_N", 16)):
        monkeypatch.setattr(km, name, val)
    check_sparse(device=kernel_device, Tq=45, Tk=45, Hq=4, Hkv=1, Hsel=4, D=16, q_block=1, k_block=24, width=2,
                 dtype=torch.float32)
    check_sparse(device=kernel_device, Tq=30, Tk=81, Hq=2, Hkv=2, Hsel=2, D=16, q_block=1, k_block=40, width=2)
    assert stats() == {"fwd": 2, "bwd": 2}


def test_keymajor_all_rows_empty(kernel_device, stats, monkeypatch, config_override):
    """A per-head selection with no key at all: out 0, lse -inf, zero gradients."""
    config_override(sparse_keymajor=True)
    q = torch.randn(1, 20, 2, 16, device=kernel_device, requires_grad=True)
    k = torch.randn(1, 20, 1, 16, device=kernel_device, requires_grad=True)
    v = torch.randn(1, 20, 1, 16, device=kernel_device, requires_grad=True)
    sel = KVSelection(torch.full((1, 2, 20, 3), -1, dtype=torch.int32, device=kernel_device), 1, 16)
    out, lse = ak.ops.sparse_attention(q, k, v, sel, return_lse=True, backend="triton")
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    (out.sum() + torch.where(torch.isinf(lse), 0, lse).sum()).backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))
    assert stats() == {"fwd": 1, "bwd": 1}


def test_uses_keymajor(kernel_device, monkeypatch, config_override):
    from attnkit import kernels

    km = kernels.load().keymajor
    config_override(sparse_keymajor=True)
    # MoBA: one selection row per query head
    assert km.uses_keymajor(64, 4, 64, 1, 64)
    assert km.uses_keymajor(16, 1, 16, 1, 16)
    assert km.uses_keymajor(8, 8, 8, 1, 128)
    # NSA-like: a selection row per KV head with a group of >= 8 heads keeps the token tiles
    assert not km.uses_keymajor(16, 1, 1, 1, 64)
    assert not km.uses_keymajor(64, 4, 4, 1, 64)
    assert not km.uses_keymajor(16, 2, 2, 1, 64)
    # block mode and gathered keys keep their kernels
    assert not km.uses_keymajor(8, 8, 8, 64, 64)
    assert not km.uses_keymajor(8, 8, 8, 1, 1)
    assert not km.uses_keymajor(8, 8, 8, 1, 8)
    config_override(sparse_keymajor=False)
    assert not km.uses_keymajor(64, 4, 64, 1, 64)


def test_path_taken(kernel_device, stats, monkeypatch, config_override):
    """Hsel == Hq runs key-major; Hsel == Hkv with a group of 8 does not; the env switch turns it off."""
    config_override(sparse_keymajor=True)
    kw = dict(Tq=9, Tk=9, Hkv=1, D=16, q_block=1, k_block=16, width=1)
    check_sparse(device=kernel_device, Hq=8, Hsel=1, **kw)
    assert stats() == {"fwd": 0, "bwd": 0}
    check_sparse(device=kernel_device, Hq=2, Hsel=2, **kw)
    assert stats() == {"fwd": 1, "bwd": 1}
    config_override(sparse_keymajor=False)
    check_sparse(device=kernel_device, Hq=2, Hsel=2, **kw)
    assert stats() == {"fwd": 1, "bwd": 1}


# --- real size on a GPU ---------------------------------------------------------------------------

GPU_CASES = {
    "moba_t4096_gqa8_bf16": dict(Tq=4096, Tk=4096, Hq=16, Hkv=2, Hsel=16, D=128, q_block=1, k_block=64, width=8),
    "moba_varlen_fp16_dv64": dict(Tq=3000, Tk=3000, Hq=8, Hkv=2, Hsel=8, D=128, Dv=64, q_block=1, k_block=128,
                                  width=4, dtype=torch.float16,
                                  cu_seqlens=torch.tensor([0, 1000, 1000, 2900, 3000], dtype=torch.int32)),
    "moba_decode_fp32": dict(Tq=1, Tk=5000, Hq=16, Hkv=4, Hsel=16, D=64, q_block=1, k_block=64, width=16,
                             dtype=torch.float32),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_keymajor_gpu(case, gpu, stats, monkeypatch, config_override):
    config_override(sparse_keymajor=True)
    check_sparse(device=gpu, chunk=256, **GPU_CASES[case])
    assert stats() == {"fwd": 1, "bwd": 1}


@pytest.mark.gpu
def test_keymajor_moba_selection_gpu(gpu, stats, monkeypatch, config_override):
    """MoBA's own selection (`methods.moba.select`) through the key-major kernels vs the reference."""
    config_override(sparse_keymajor=True)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4096, h, 128, generator=g).to(gpu, torch.bfloat16) for h in (16, 2, 2))
    sel = ak.methods.moba.select(q, k, block_size=64, topk=8)
    out = ak.ops.sparse_attention(q, k, v, sel, backend="triton")
    ref = ak.ops.sparse_attention(q.double(), k.double(), v.double(), sel, backend="reference")
    base = ak.ops.sparse_attention(q.float(), k.float(), v.float(), sel, backend="reference").to(q.dtype)
    from tests.conftest import assert_close_rule

    assert_close_rule(out, ref, base, "moba keymajor out")
    assert stats()["fwd"] == 1
