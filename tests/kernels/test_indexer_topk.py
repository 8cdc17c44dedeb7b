"""DSA's indexer fused with its top-k (`kernels/selection/indexer_topk.py`) against the definition:
each query's k best visible keys by `sum_h w * relu(q_idx . k_idx)`, equal scores by smaller index.
In Triton's CPU interpreter at small shapes (small tiles, a narrow buffer: many counting rounds), on
a GPU at a real size. Inputs are small integers, so every score is exact in any summation order and
ties are common; the definition then is a stable sort of the float64 scores."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit import config
from attnkit.core.contract import validate_attention
from attnkit.methods import dsa

from ..methods._cases import qkv


@pytest.fixture
def mod(kernel_device, monkeypatch):
    from attnkit import kernels

    m = kernels.load_module("selection.indexer_topk")
    if kernel_device == "cpu":  # many tiles, few edges and a narrow buffer: several rounds per row
        for name, val in dict(BLOCK_M=16, BLOCK_N=32, SAMPLE=16, EDGES=8, CAP_FACTOR=1, MIN_CAP=16).items():
            monkeypatch.setattr(m, name, val)
    return m


def int_inputs(N, Tq, Tk, hi, di, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, top, *shape: torch.randint(lo, top, shape, generator=g).to(dtype).to(device)  # noqa: E731
    return r(-2, 3, N, Tq, hi, di), r(-2, 3, N, Tk, di), r(-1, 3, N, Tq, hi)


def definition(q_idx, k_idx, w, k_len, offset, causal, k):
    """`[N][Tq]` ascending lists: each row's k largest visible scores, ties by smaller index."""
    s = torch.einsum("nth,nths->nts", w.double().cpu(),
                     torch.einsum("nthd,nsd->nths", q_idx.double().cpu(), k_idx.double().cpu()).relu())
    out = []
    for n in range(s.shape[0]):
        rows = []
        for i in range(s.shape[1]):
            L = int(k_len[n]) if not causal else max(0, min(int(k_len[n]), i + offset + 1))
            rows.append(sorted(torch.sort(-s[n, i, :L], stable=True).indices[:k].tolist()))
        out.append(rows)
    return out


def assert_rows(got, want, label=""):
    got = got.cpu()
    for n, rows in enumerate(want):
        for i, row in enumerate(rows):
            g = got[n, i].tolist()
            assert g[: len(row)] == row, f"{label} sequence {n} row {i}: got {g[:len(row)]}, want {row}"
            assert all(x == -1 for x in g[len(row):]), f"{label} sequence {n} row {i}: -1 padding not last"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("k,tq,tk", [(1, 37, 53), (16, 45, 75), (5, 60, 41), (2048, 9, 2090), ("T", 29, 40)])
def test_fused_topk_is_the_definition(mod, kernel_device, monkeypatch, k, tq, tk, causal):
    """k in {1, 16, 2048, T} (and 5); Tq != Tk both ways (bottom-right aligned: with Tq > Tk the first
    causal rows see no key); Tk not a multiple of the tiles; the second sequence has fewer keys;
    causal rows with fewer than k keys keep them all."""
    kk = tk if k == "T" else k
    if kernel_device == "cpu" and tk > 1000:  # fewer, wider tiles keep the interpreter quick
        monkeypatch.setattr(mod, "BLOCK_N", 128)
    q_idx, k_idx, w = int_inputs(2, tq, tk, 3, 8, seed=tq + tk, device=kernel_device)
    k_len = torch.tensor([tk, tk - 11], device=kernel_device)
    got = mod.indexer_topk(q_idx, k_idx, w, k_len, tk - tq, causal, kk, max_rows=17)
    assert got.shape == (2, tq, min(kk, tk)) and got.dtype == torch.int32
    assert_rows(got, definition(q_idx, k_idx, w, k_len, tk - tq, causal, kk))


def test_fused_topk_all_equal_scores_take_the_first_keys(mod, kernel_device):
    """One score value everywhere (w = 0): the bracket cannot be split, ties go by index."""
    q_idx, k_idx, w = int_inputs(1, 40, 300, 2, 8, seed=3, device=kernel_device)
    rounds = []
    got = mod.indexer_topk(q_idx, k_idx, w * 0, torch.tensor([300], device=kernel_device), 260, True, 21,
                           rounds=rounds)
    want = [[list(range(min(21, i + 261))) for i in range(40)]]
    assert_rows(got, want)
    # the sample's range is the single value: one round isolates it
    assert len(rounds) == 1 and rounds[0].max().item() == 1, f"counting rounds {rounds}"


def test_fused_topk_rows_that_fit_the_buffer_take_no_round(mod, kernel_device):
    q_idx, k_idx, w = int_inputs(1, 20, 30, 2, 8, seed=6, device=kernel_device)
    rounds = []
    got = mod.indexer_topk(q_idx, k_idx, w, torch.tensor([30], device=kernel_device), 10, True, 20, rounds=rounds)
    assert_rows(got, definition(q_idx, k_idx, w, [30], 10, True, 20))  # buffer: 32 >= 30 keys
    assert all(r.max().item() == 0 for r in rounds), f"counting rounds {rounds}"


def test_fused_topk_random_scores(mod, kernel_device):
    """Real-valued scores of both signs (distinct but for relu zeros), value-spaced edges at work."""
    g = torch.Generator().manual_seed(5)
    q_idx, k_idx, w = (torch.randn(*s, generator=g).to(kernel_device) for s in ((1, 50, 2, 8), (1, 400, 8), (1, 50, 2)))
    k_len = torch.tensor([400], device=kernel_device)
    got = mod.indexer_topk(q_idx, k_idx, w, k_len, 350, True, 24)
    # float32 scores: compare the selected values with the float64 top values (rounding may swap near-ties)
    s = torch.einsum("th,ths->ts", w[0].double().cpu(),
                     torch.einsum("thd,sd->ths", q_idx[0].double().cpu(), k_idx[0].double().cpu()).relu())
    for i in range(50):
        sel = [x for x in got[0, i].tolist() if x >= 0]
        assert len(sel) == len(set(sel)) == 24 and sel == sorted(sel)
        want = s[i, : i + 351].topk(24).values
        torch.testing.assert_close(s[i, sel].sort(descending=True).values, want, rtol=1e-5, atol=1e-5)


def test_fused_topk_rejects_a_buffer_too_wide(mod, kernel_device):
    z = torch.zeros(1, 4, 1, 8, device=kernel_device)
    with pytest.raises(ValueError, match="candidates"):
        mod.indexer_topk(z, torch.zeros(1, 40000, 8, device=kernel_device), z[..., 0], torch.tensor([4]), 0, False,
                         20000)


def _select(fused: bool, *args, **kw):
    with config.override(dsa_fused_topk_devices=("cuda", "cpu") if fused else ()):
        call = validate_attention(args[0], args[1], args[1], causal=kw["causal"],
                                                   cu_seqlens=kw.get("cu_seqlens"))
        opts = dsa.DsaOptions(kw["topk"], kw["q_idx"], kw["k_idx"], kw["w"])
        assert (dsa._fused_topk_kernel(call, opts) is not None) == fused, "the fused path was not taken as asked"
        return dsa.select(*args, **kw).indices


@pytest.mark.parametrize("causal", [True, False])
def test_dsa_select_through_the_fused_path_is_the_definition(mod, kernel_device, causal):
    tq, tk, topk = 33, 70, 9
    q, k, _ = qkv(2, tq, tk, 2, 1, D=8)
    q_idx, k_idx, w = int_inputs(2, tq, tk, 3, 8, seed=11, device=kernel_device)
    ind = dict(q_idx=q_idx, k_idx=k_idx, w=w)
    got = _select(True, q.to(kernel_device), k.to(kernel_device), topk=topk, causal=causal, **ind)
    assert got.shape == (2, 1, tq, topk)
    want = definition(q_idx, k_idx, w, torch.tensor([tk, tk]), tk - tq, causal, topk)
    assert_rows(got[:, 0], want)
    other = _select(False, q.to(kernel_device), k.to(kernel_device), topk=topk, causal=causal, **ind)
    assert torch.equal((got >= 0).sum(-1), (other >= 0).sum(-1)), "the tile path keeps other row lengths"


def test_dsa_select_fused_varlen_is_the_definition(mod, kernel_device):
    cu = torch.tensor([0, 23, 24, 61], dtype=torch.int32, device=kernel_device)
    q, k, _ = qkv(1, 61, 61, 2, 1, D=8)
    q_idx, k_idx, w = int_inputs(1, 61, 61, 2, 8, seed=4, device=kernel_device)
    got = _select(True, q.to(kernel_device), k.to(kernel_device), topk=6, causal=True, cu_seqlens=cu,
                  q_idx=q_idx, k_idx=k_idx, w=w)[:, 0]
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        want = definition(q_idx[:, a:b], k_idx[:, a:b], w[:, a:b], torch.tensor([b - a]), 0, True, 6)
        assert_rows(got[n : n + 1, : b - a], want, f"varlen sequence {n}:")


def test_fused_path_is_off_by_default_and_explained(mod, kernel_device):
    assert config.get().dsa_fused_topk_devices == ()
    q, k, _ = qkv(1, 8, 8, 2, 1, D=8)
    q_idx, k_idx, w = int_inputs(1, 8, 8, 2, 8, seed=1)
    text = str(ak.explain(q, k, k, "dsa", topk=4, q_idx=q_idx, k_idx=k_idx, w=w))
    assert "fused_topk: off" in text
    with config.override(dsa_fused_topk_devices=("cpu",)):
        text = str(ak.explain(q, k, k, "dsa", topk=4, q_idx=q_idx, k_idx=k_idx, w=w))
    assert "fused_topk: on" in text


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_fused_topk_at_real_size_gpu(gpu, causal):
    """T = 8192, Hi = 4, Di = 64, bf16 integer inputs (exact scores, many ties), k = 2048 and 16."""
    from attnkit import kernels

    m = kernels.load_module("selection.indexer_topk")
    T = 8192
    q_idx, k_idx, w = int_inputs(1, T, T, 4, 64, seed=2, dtype=torch.bfloat16, device=gpu)
    k_len = torch.tensor([T], device=gpu)
    s = torch.einsum("th,ths->ts", w[0].float(), torch.einsum("thd,sd->ths", q_idx[0].float(), k_idx[0].float()).relu())
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=gpu).triu(1), float("-inf"))
    # stable descending sort: equal scores by smaller index (the definition)
    order = torch.sort(-s, dim=-1, stable=True).indices
    for k in (2048, 16):
        got = m.indexer_topk(q_idx, k_idx, w, k_len, 0, causal, k)
        n = torch.arange(T, device=gpu) + 1 if causal else torch.full((T,), T, device=gpu)
        want = order[:, :k].sort(-1).values.to(torch.int32)
        keep = torch.arange(k, device=gpu)[None, :] < n.clamp_max(k)[:, None]
        want = torch.where(keep, want, -1)
        bad = (got != want).any(-1).nonzero()
        assert bad.numel() == 0, f"k={k}: {bad.numel()} rows differ, first {bad[:3].flatten().tolist()}"
