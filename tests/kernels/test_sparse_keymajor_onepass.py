"""The one-pass forward of the key-major executor (`kernels.sparse.keymajor_onepass`: a per-row
score bound instead of the LSE pass) against the float64 reference executor, by the 2x rule of
DESIGN.md section 7 (outputs, LSE, and the gradients of the windowed backward that follows it);
its fallback to the two-pass forward when a bound is too loose; float32 inputs take the two-pass
forward. Tiny shapes in Triton's CPU interpreter; `@pytest.mark.gpu` repeats them at a real size.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import attnkit as ak

from .helpers import check_sparse
from .test_sparse_keymajor import GPU_CASES, TINY

HALF = sorted(name for name, kw in TINY.items() if kw.get("dtype", torch.bfloat16) != torch.float32)


@pytest.fixture
def onepass(kernel_device, config_override, monkeypatch):
    """The one-pass variant selected, small windows; `.mod`, `.calls()` since the test began."""
    from attnkit import kernels

    mod = kernels.load()
    config_override(sparse_keymajor=True, sparse_keymajor_variant="onepass")
    monkeypatch.setattr(mod.keymajor_windowed, "WINDOW", 8)
    monkeypatch.setattr(mod.keymajor_windowed, "BWD_WINDOW", 8)
    op = mod.keymajor_onepass
    before = dict(op.STATS)
    return SimpleNamespace(mod=op, calls=lambda: {k: op.STATS[k] - before[k] for k in before})


@pytest.mark.parametrize("case", HALF)
def test_onepass_tiny(case, kernel_device, onepass):
    kw = dict(TINY[case])
    kw.setdefault("q_block", 1)
    check_sparse(device=kernel_device, **kw)
    assert onepass.calls() == {"fwd": 1, "fallback": 0}


def test_onepass_small_tiles(kernel_device, onepass, monkeypatch):
    """Several work items per cell, key sub-tiles (k_block 40 over 16-key tiles), several steps of
    the norm and bound kernels."""
    from attnkit import kernels

    kw_mod = kernels.load().keymajor_windowed
    for name, val in (("ENTRY_CHUNK", 32), ("FWD_BLOCK_M", 16), ("FWD_MAX_BLOCK_N", 16), ("INTERPRETER_PROGRAMS", 2)):
        monkeypatch.setattr(kw_mod, name, val)
    monkeypatch.setattr(onepass.mod, "NORM_ROWS", 16)
    monkeypatch.setattr(onepass.mod, "BOUND_ROWS", 16)
    check_sparse(device=kernel_device, Tq=30, Tk=81, Hq=2, Hkv=2, Hsel=2, D=16, q_block=1, k_block=40, width=2)
    assert onepass.calls() == {"fwd": 1, "fallback": 0}


def test_onepass_loose_bound_falls_back(kernel_device, onepass):
    """Keys of huge norm in one block and tiny scores elsewhere: the bound overshoots the row
    maximum by far more than 86 bits, the call is recomputed two-pass, and the result is exact."""
    g = torch.Generator().manual_seed(1)
    t, hq, d = 48, 2, 16
    q = torch.randn(1, t, hq, d, generator=g)
    k = torch.randn(1, t, 1, d, generator=g)
    k[:, :16] = 0
    k[:, 5], k[:, 6] = 3000.0, -3000.0  # block 0: two huge keys, one of them scores high
    k[:, 16:] *= 1e-3
    v = torch.randn(1, t, 1, d, generator=g)
    q, k, v = (x.to(kernel_device, torch.bfloat16) for x in (q, k, v))
    idx = torch.tensor([0, 2], dtype=torch.int32, device=kernel_device).view(1, 1, 1, 2).expand(1, hq, t, 2)
    sel = ak.KVSelection(idx.contiguous(), 1, 16)
    out, lse = ak.ops.sparse_attention(q, k, v, sel, return_lse=True, backend="triton")
    ref = ak.ops.sparse_attention(q.double(), k.double(), v.double(), sel, return_lse=True, backend="reference")
    base = ak.ops.sparse_attention(q.float(), k.float(), v.float(), sel, return_lse=True, backend="reference")
    from tests.conftest import assert_close_rule

    assert_close_rule(out, ref[0], base[0].to(q.dtype), "onepass fallback out")
    assert_close_rule(lse, ref[1], base[1], "onepass fallback lse")
    assert onepass.calls() == {"fwd": 1, "fallback": 1}


def test_onepass_float32_takes_two_passes(kernel_device, onepass):
    check_sparse(device=kernel_device, Tq=29, Tk=29, Hq=4, Hkv=1, Hsel=4, D=16, q_block=1, k_block=16, width=2,
                 dtype=torch.float32)
    assert onepass.calls() == {"fwd": 0, "fallback": 0}


# --- real size on a GPU ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(c for c, kw in GPU_CASES.items() if kw.get("dtype") != torch.float32))
def test_onepass_gpu(case, gpu, config_override):
    from attnkit import kernels

    op = kernels.load().keymajor_onepass
    config_override(sparse_keymajor=True, sparse_keymajor_variant="onepass")
    before = dict(op.STATS)
    check_sparse(device=gpu, chunk=256, **GPU_CASES[case])
    assert {k: op.STATS[k] - before[k] for k in before} == {"fwd": 1, "fallback": 0}


@pytest.mark.gpu
def test_onepass_moba_selection_gpu(gpu, config_override):
    """MoBA's own selection through the one-pass forward vs the reference."""
    from attnkit import kernels
    from tests.conftest import assert_close_rule

    op = kernels.load().keymajor_onepass
    config_override(sparse_keymajor=True, sparse_keymajor_variant="onepass")
    before = op.STATS["fwd"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4096, h, 128, generator=g).to(gpu, torch.bfloat16) for h in (16, 2, 2))
    sel = ak.methods.moba.select(q, k, block_size=64, topk=8)
    out = ak.ops.sparse_attention(q, k, v, sel, backend="triton")
    ref = ak.ops.sparse_attention(q.double(), k.double(), v.double(), sel, backend="reference")
    base = ak.ops.sparse_attention(q.float(), k.float(), v.float(), sel, backend="reference").to(q.dtype)
    assert_close_rule(out, ref, base, "moba onepass out")
    assert op.STATS["fwd"] - before == 1
