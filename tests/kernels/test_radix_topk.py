"""The radix select (`kernels/selection/radix_topk.py`, DSA's top-k) against `torch.topk` and the
definition; in Triton's CPU interpreter at small shapes (small steps: many per row), on a GPU at a
real size."""

from __future__ import annotations

import pytest
import torch

import attnkit.methods.dsa as dsa
import attnkit.methods.router as router
from attnkit import config

from ..methods._cases import indexer_inputs, qkv


@pytest.fixture
def mod(kernel_device, monkeypatch):
    from attnkit import kernels

    m = kernels.load_module("selection.radix_topk")
    if kernel_device == "cpu":
        monkeypatch.setattr(m, "BLOCK", 64)
    return m


def stable_topk_rows(s: torch.Tensor, lengths: list[int], k: int) -> list[list[int]]:
    """The definition: each row's k largest among its first `lengths[r]` scores, equal scores by
    smaller index first (a stable descending sort), as ascending index lists."""
    return [sorted(torch.sort(-s[r, :n], stable=True).indices[:k].tolist()) for r, n in enumerate(lengths)]


def valid(row: torch.Tensor) -> list[int]:
    return [x for x in row.tolist() if x >= 0]


@pytest.mark.parametrize("k", [1, 16, 2048, "T"])
def test_radix_select_is_topk_as_sets_with_ties_by_index(mod, kernel_device, k):
    R, C = 6, 300
    g = torch.Generator().manual_seed(7)
    s = torch.randn(R, C, generator=g)
    s[1] = torch.randint(-3, 3, (C,), generator=g).float()  # heavy ties across the threshold
    s[2] = 0.0
    s[2, ::3] = -0.0  # -0.0 and +0.0 are one value
    s[3, 10:20] = float("-inf")  # -inf scores are still scores inside the valid prefix
    lengths = torch.tensor([C, C, C, C, 0, 37])
    kk = C if k == "T" else k
    got = mod.radix_topk(s.to(kernel_device), lengths, kk).cpu()
    assert got.shape == (R, min(kk, C)) and got.dtype == torch.int32
    want = stable_topk_rows(s, lengths.tolist(), kk)
    for r in range(R):
        assert valid(got[r]) == want[r], f"row {r} differs"
        n = len(want[r])
        assert (got[r, n:] == -1).all() and (got[r, :n] >= 0).all(), f"row {r}: -1 padding not last"
    for r in (0, 5):  # distinct scores: exactly torch.topk's set
        n = min(kk, int(lengths[r]))
        assert set(valid(got[r])) == set(s[r, : int(lengths[r])].topk(n).indices.tolist())


def test_radix_select_is_not_dispatched_by_default():
    """Measured slower than `torch.topk` for DSA on an H100 (docs/executors.md)."""
    assert config.get().radix_topk_devices == ()
    assert router.radix_kernel(torch.device("cpu"), torch.float32) is None


def test_radix_select_rejects_other_dtypes(mod, kernel_device):
    with pytest.raises(ValueError, match="float32"):
        mod.radix_topk(torch.zeros(2, 8, dtype=torch.float16, device=kernel_device), torch.tensor([8, 8]), 2)


def _dsa_select(kernel: bool, monkeypatch, *args, **kw):
    taken = []
    real = dsa.radix_kernel
    monkeypatch.setattr(dsa, "radix_kernel", lambda *a: taken.append(real(*a)) or taken[-1])
    with config.override(radix_topk_devices=("cuda", "cpu") if kernel else ()):
        sel = dsa.select(*args, **kw)
    assert (taken[-1] is not None) == kernel, "the radix path was not taken as asked"
    return sel.indices.cpu()


def definition_rows(q, k, ind, topk, causal, cu=None):
    """DSA's rows by the definition on the indexer's own scores (the same tiles the policy scores):
    per query, the top-k visible keys, equal scores by smaller index. `[N][Tq]` ascending lists."""
    from attnkit.core.contract import validate_attention
    from attnkit.methods.router import seq_view

    view = seq_view(validate_attention(q, k, k, causal=causal, cu_seqlens=cu))
    with torch.no_grad():
        s = dsa._Indexer(view, ind["q_idx"], ind["k_idx"], ind["w"])(slice(0, view.tq), slice(0, view.tk)).cpu()
    pos = view.q_pos().cpu()
    out = []
    for n in range(s.shape[0]):
        lens = view.k_len[n].cpu().clamp_max(pos + 1 if causal else view.tk).clamp_min(0).expand(view.tq)
        out.append(stable_topk_rows(s[n], lens.tolist(), topk))
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tq,tk,topk", [(40, 40, 5), (9, 70, 16), (30, 45, 64)])
def test_dsa_through_the_radix_select_is_the_definition(mod, kernel_device, monkeypatch, tq, tk, topk, causal):
    """Ties are common (relu zeros): rows equal the definition with ties by index; the PyTorch
    path (`torch.topk`, ties arbitrary) selects the same score values."""
    q, k, _ = qkv(2, tq, tk, 2, 1, D=8, dtype=torch.float32, seed=tq + tk)
    ind = indexer_inputs(2, tq, tk, hi=3, di=8, dtype=torch.float32, seed=tq * 3 + tk)
    q, k = q.to(kernel_device), k.to(kernel_device)
    ind = {n: t.to(kernel_device) for n, t in ind.items()}
    got = _dsa_select(True, monkeypatch, q, k, topk=topk, causal=causal, **ind)
    want = definition_rows(q, k, ind, topk, causal)
    other = _dsa_select(False, monkeypatch, q, k, topk=topk, causal=causal, **ind)
    assert got.shape == other.shape
    for n in range(2):
        for i in range(tq):
            assert valid(got[n, 0, i]) == want[n][i], f"sequence {n} row {i} differs from the definition"
            assert len(valid(other[n, 0, i])) == len(want[n][i])


def test_dsa_radix_varlen_is_the_definition(mod, kernel_device, monkeypatch):
    cu = torch.tensor([0, 23, 24, 61], dtype=torch.int32, device=kernel_device)
    q, k, _ = qkv(1, 61, 61, 2, 1, D=8, dtype=torch.float32, seed=9)
    ind = {n: t.to(kernel_device) for n, t in indexer_inputs(1, 61, 61, hi=2, di=8, seed=4).items()}
    q, k = q.to(kernel_device), k.to(kernel_device)
    got = _dsa_select(True, monkeypatch, q, k, topk=6, causal=True, cu_seqlens=cu, **ind)
    want = definition_rows(q, k, ind, 6, True, cu)
    for n, length in enumerate((cu[1:] - cu[:-1]).tolist()):
        for i in range(length):
            assert valid(got[n, 0, i]) == want[n][i], f"sequence {n} row {i} differs"


@pytest.mark.gpu
def test_radix_select_at_real_size_gpu(gpu):
    """Rows of 65536 scores, k = 2048: the set of torch.topk (distinct random scores)."""
    from attnkit import kernels

    m = kernels.load_module("selection.radix_topk")
    s = torch.randn(64, 65536, device=gpu)
    lengths = torch.randint(1, 65537, (64,), device=gpu)
    lengths[0] = 65536
    got = m.radix_topk(s, lengths, 2048)
    for r in range(64):
        n = min(2048, int(lengths[r]))
        want = s[r, : int(lengths[r])].topk(n).indices.sort().values.to(torch.int32)
        assert torch.equal(got[r, :n], want) and (got[r, n:] == -1).all(), f"row {r} differs"
