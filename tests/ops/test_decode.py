"""`ops.decode_attention`: reference and sdpa against the float64 oracle; the Triton kernel under
the CPU interpreter (a subprocess, so TRITON_INTERPRET stays out of other tests) and on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnkit.core import naive_attention
from attnkit.core.contract import AttnkitError
from attnkit.core.selection import KVSelection
from attnkit.kv.paged import PagedLayerCache
from attnkit.ops import decode_attention

from ..conftest import assert_close64, assert_close_rule

ROOT = Path(__file__).resolve().parents[2]


def _cache(B, T, H, D, Dv, ps, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, H, Dv, generator=g, dtype=torch.float64)
    c = PagedLayerCache(B, H, D, Dv, page_size=ps, dtype=dtype)
    c.append(k.to(dtype), v.to(dtype))
    return c, k, v


@given(B=st.integers(1, 2), T=st.integers(1, 40), hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 3]),
       tq=st.integers(1, 3), ps=st.sampled_from([1, 4, 16]), dv=st.sampled_from([4, 8]))
def test_reference_equals_oracle_on_full_cache(B, T, hkv, group, tq, ps, dv):
    tq = min(tq, T)
    c, k, v = _cache(B, T, hkv, 8, dv, ps, torch.float64)
    q = torch.randn(B, tq, hkv * group, 8, dtype=torch.float64)
    out, lse = decode_attention(q, c, return_lse=True, backend="reference")
    ref, ref_lse = naive_attention(q, k, v, causal=True)  # bottom-right: query i sits at T - tq + i
    assert_close64(out, ref)
    assert_close64(lse, ref_lse)


def test_selection_restricts_keys():
    c, k, v = _cache(1, 20, 2, 8, 8, 4, torch.float64)
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    sel = KVSelection(torch.tensor([[[[0, 3, -1]], [[4, -1, -1]]]], dtype=torch.int32), q_block=1, k_block=4)
    out = decode_attention(q, c, sel, backend="reference")
    ref, _ = naive_attention(q, k, v, causal=True, selection=sel)
    assert_close64(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sdpa_follows_the_2x_rule(dtype):
    c, k, v = _cache(2, 50, 2, 16, 16, 8, dtype)
    c.evict(torch.tensor([[[1, 9, 30]] * 2] * 2))  # holes must be masked
    q = torch.randn(2, 1, 6, 16, dtype=torch.float64)
    keep = torch.ones(50, dtype=torch.bool)
    keep[[1, 9, 30]] = False
    oracle, _ = naive_attention(q, k[:, keep], v[:, keep], causal=False)
    base, _ = naive_attention(q.to(dtype), k[:, keep].to(dtype), v[:, keep].to(dtype), causal=False, compute_dtype=None)
    out = decode_attention(q.to(dtype), c, backend="sdpa")
    assert_close_rule(out, oracle, base)
    assert_close_rule(decode_attention(q.to(dtype), c, backend="reference"), oracle, base)


def test_errors_name_the_argument():
    c, _, _ = _cache(1, 8, 2, 8, 8, 4, torch.float32)
    with pytest.raises(AttnkitError, match="q:"):
        decode_attention(torch.randn(1, 1, 3, 8), c)
    with pytest.raises(AttnkitError, match="q:"):
        decode_attention(torch.randn(1, 1, 2, 8, dtype=torch.float64), c)
    with pytest.raises(AttnkitError, match="cache"):
        decode_attention(torch.randn(1, 1, 2, 8), "cache")
    with pytest.raises(AttnkitError, match="backend"):
        decode_attention(torch.randn(1, 1, 2, 8), c, backend="flash")
    with pytest.raises(AttnkitError, match="backend"):
        decode_attention(torch.randn(1, 1, 2, 8), c, return_lse=True, backend="sdpa")
    with pytest.raises(AttnkitError, match="selection"):
        decode_attention(torch.randn(1, 1, 2, 8), c, KVSelection(torch.full((1, 2, 1, 1), 5, dtype=torch.int32), 1, 4))
    with pytest.raises(AttnkitError, match="triton"):
        decode_attention(torch.randn(1, 1, 2, 8), c, backend="triton")  # CPU without the interpreter


def test_triton_kernel_under_the_cpu_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ops" / "decode_triton_cases.py"), "tiny"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"triton decode under the interpreter failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.stdout.count(" ok") == 16, proc.stdout  # 4 cases x (quest page scores + 3 key lists)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: needs CUDA (its CPU twin runs under the interpreter)")
def test_triton_kernel_on_gpu_at_real_sizes():
    sys.path.insert(0, str(ROOT / "tests" / "ops"))
    from decode_triton_cases import LARGE, run

    assert run(LARGE, "cuda") == 0
