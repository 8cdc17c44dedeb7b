"""Fidelity, recall and density against the naive oracle on small shapes (T x T allowed here only)."""

from __future__ import annotations

import pytest
import torch

from attnkit.bench import metrics
from attnkit.bench.report import pareto_front
from attnkit.bench.visibility import Visibility, resolve
from attnkit.core import KVSelection, masks, naive_attention, validate_attention
from attnkit.registry import get_method, methods


def _qk(B=1, T=48, Hq=4, Hkv=2, D=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, T, Hq, D, generator=g), torch.randn(B, T, Hkv, D, generator=g)


def _oracle_recall(q, k, dense_vis):
    """Per-row recall from materialised probabilities: `[B, Hq, T]`."""
    v = torch.zeros(*k.shape[:3], 1, dtype=torch.float64)
    _, lse = naive_attention(q.double(), k.double(), v, causal=True)
    qh = q.double().transpose(1, 2)
    kh = k.double().transpose(1, 2).repeat_interleave(q.shape[2] // k.shape[2], 1)
    p = torch.exp(qh @ kh.transpose(-1, -2) * q.shape[-1] ** -0.5 - lse.unsqueeze(-1))
    T = q.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return (p * (dense_vis & causal)).sum(-1)


def _random_selection(B, H, nq, nk, width, gen):
    idx = torch.stack([torch.randperm(nk, generator=gen)[:width] for _ in range(B * H * nq)]).view(B, H, nq, width)
    idx[..., -1] = -1  # some padding
    return KVSelection(idx.to(torch.int32), q_block=4, k_block=8)


@pytest.mark.parametrize("hsel", [4, 2, 1])
def test_selection_recall_and_density_match_oracle(hsel: int) -> None:
    q, k = _qk()
    B, T, Hq, _ = q.shape
    sel = _random_selection(B, hsel, T // 4, T // 8, 3, torch.Generator().manual_seed(2))
    vis = Visibility("select", B, Hq, k.shape[2], T, T, True, selection=sel)
    dense = sel.to_dense_mask(Hq, k.shape[2], T, T)
    want = _oracle_recall(q, k, dense)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    want_density = (dense & causal).sum().item() / (B * Hq * causal.sum().item())
    cross = metrics.inspect_selection_stats(vis, q, k, q.shape[-1] ** -0.5)
    assert cross is not None, "attnkit.methods.inspect is missing: no cross-check of the bench's recall"
    for stats in (metrics.selection_stats(vis, q, k), cross):
        assert abs(stats.recall - want.mean().item()) < 1e-9, f"{stats.computed_by}: recall {stats.recall} vs oracle {want.mean().item()}"
        assert abs(stats.recall_min - want.min().item()) < 1e-9, f"{stats.computed_by}: min {stats.recall_min} vs {want.min().item()}"
        assert abs(stats.density - want_density) < 1e-12, f"{stats.computed_by}: density {stats.density} vs {want_density}"


def test_mask_visibility_recall_matches_oracle_and_full_is_one() -> None:
    q, k = _qk()
    B, T, Hq, _ = q.shape
    m = masks.strided(2, window=3)
    vis = Visibility("mask", B, Hq, k.shape[2], T, T, True, mask=m)
    want = _oracle_recall(q, k, masks.dense_mask(m, B, Hq, T, T, False))
    stats = metrics.own_selection_stats(vis, q, k, q.shape[-1] ** -0.5)
    assert abs(stats.recall - want.mean().item()) < 1e-9, f"recall {stats.recall} vs oracle {want.mean().item()}"
    full = Visibility("mask", B, Hq, k.shape[2], T, T, True, mask=masks.sliding_window(T))
    stats = metrics.own_selection_stats(full, q, k, q.shape[-1] ** -0.5)
    assert stats.recall == 1.0 and stats.recall_min == 1.0 and stats.density == 1.0, stats


def test_needle_hits_count_visible_pairs() -> None:
    vis = Visibility("mask", 1, 2, 2, 32, 32, True, mask=masks.sliding_window(4))
    pairs = torch.tensor([[10, 8], [10, 2], [20, 19], [5, 6]])  # visible, too far, visible, future
    hits = vis.pairs(pairs, torch.device("cpu"))
    assert hits.tolist() == [[[True, False, True, False]] * 2], hits


def test_fidelity_and_exact_reference() -> None:
    q, k = _qk()
    v = torch.randn_like(k)
    ref_out, ref_lse = metrics.exact_reference(q, k, v, causal=True)
    out64, lse64 = naive_attention(q.double(), k.double(), v.double(), causal=True)
    assert (ref_out - out64).abs().max() < 1e-12 and (ref_lse - lse64).abs().max() < 1e-12
    f = metrics.fidelity(ref_out.float(), ref_out, ref_lse.float(), ref_lse)
    assert f.rel_error < 1e-6 and abs(f.cosine - 1) < 1e-9 and f.lse_error < 1e-6 and f.empty_rows == 0, f
    f = metrics.fidelity(torch.zeros_like(ref_out), ref_out)
    assert f.rel_error == 1.0 and f.cosine == 0.0 and f.lse_error is None, f


def test_visible_pairs_and_flops() -> None:
    assert metrics.visible_pairs_causal(2, 3, 4, 4, True) == 2 * 3 * 10
    assert metrics.visible_pairs_causal(1, 1, 2, 5, True) == 4 + 5  # bottom-right aligned
    assert metrics.visible_pairs_causal(1, 1, 3, 5, False) == 15
    assert metrics.attention_flops(10, 64, 32) == 2 * 96 * 10


def test_every_registered_sparse_method_resolves_or_says_why() -> None:
    q, k = _qk(T=64)
    v = torch.randn_like(k)
    for spec in methods():
        call = validate_attention(q, k, v) if spec.capabilities.gqa else validate_attention(q, q, q)
        if spec.family == "linear":  # no visibility by design; checked without calling example()
            assert resolve(spec, call, {})[0] is None
            continue
        vis, why = resolve(spec, call, spec.example(call))
        assert isinstance(why, str) and why, spec.name
        if vis is not None:
            stats = metrics.selection_stats(vis, call.q, call.k, call.scale)
            assert 0.0 <= stats.recall <= 1.0 + 1e-9 and 0.0 < stats.density <= 1.0 + 1e-9, (spec.name, stats)


def test_select_pickup_passes_options_by_name() -> None:
    spec = get_method("moba")
    q, k = _qk(T=64)
    call = validate_attention(q, k, k)
    vis, why = resolve(spec, call, {"block_size": 16, "topk": 64})
    assert vis is not None and vis.source == "select" and why == "attnkit.methods.moba.select"
    stats = metrics.selection_stats(vis, q, k)
    assert abs(stats.recall - 1.0) < 1e-6 and abs(stats.density - 1.0) < 1e-12, f"topk >= blocks: {stats}"


def test_pareto_front() -> None:
    pts = [(1.0, 1e-7), (2.0, 0.1), (3.0, 0.5), (2.5, 0.6), (0.5, 1e-3)]
    assert sorted(pareto_front(pts)) == [0, 1, 2], pareto_front(pts)
