"""The selection-aware exchange equals the single-process selection method and sends exactly the
selected key blocks of other ranks."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from .cases import CASES, selection_bytes
from .checks import assert_matches_single_process
from .conftest import case_result

SEL = [(w, c) for w in CASES for c in CASES[w] if c.op == "selection"]


@pytest.mark.parametrize("world,case", SEL, ids=[f"w{w}-{c.name}" for w, c in SEL])
def test_selection_ring_matches_single_process_method(world_results, world, case):
    assert_matches_single_process(case, case_result(world_results(world), case.name))


@pytest.mark.parametrize("world,case", SEL, ids=[f"w{w}-{c.name}" for w, c in SEL])
def test_selection_ring_sends_only_selected_blocks(world_results, world, case):
    res = case_result(world_results(world), case.name)
    want = selection_bytes(case, world)
    assert res["bytes_forward"] == want, f"{case.name}: sent {res['bytes_forward']} B forward, selected blocks are {want} B"
    # gradients of the same blocks travel back, in float64 like the inputs here
    assert res["bytes_backward"] == want, f"{case.name}: sent {res['bytes_backward']} B backward, expected {want} B"
    assert res["steps"] + res["skipped_steps"] == world, f"{case.name}: steps {res['steps']} + skipped " \
        f"{res['skipped_steps']} != {world}"


def test_local_selection_skips_far_steps(world_results):
    """Each block selecting itself and its predecessor (contiguous, world 4) needs only the previous
    rank: one exchange round, two skipped."""
    res = case_result(world_results(4), "selection_local_contiguous")
    assert (res["steps"], res["skipped_steps"]) == (2, 2), f"steps {res['steps']}, skipped {res['skipped_steps']}"


@pytest.mark.parametrize("world,case", SEL, ids=[f"w{w}-{c.name}" for w, c in SEL])
def test_selection_ring_reports_its_local_calls(world_results, world, case):
    """On the CPU the dispatcher puts the local calls (past blocks, and the diagonal blocks when
    causal; rank 0 reports) on the reference, and `stats.kernels` names each call."""
    res = case_result(world_results(world), case.name)
    assert list(res["kernels"]) == ["reference"], f"{case.name}: kernels {res['kernels']}"
    why = res["kernels"]["reference"]
    pieces = [p for p in ("past blocks via", "diagonal blocks (causal) via") if p in why]
    assert len(pieces) == res["calls"] and res["calls"] >= 1, f"{case.name}: {res['calls']} calls, {why}"
    assert case.causal or "diagonal" not in why, why  # without causality every block is one call
    assert res["predicted_kernels"] == res["kernels"], f"explain said {res['predicted_kernels']}"
    assert res["predicted_forward"] == res["bytes_forward"], f"explain: {res['predicted_forward']} B received"


def test_random_cases_cover_the_split_edges():
    """The random selections skip some query block's own (diagonal) blocks and select others', and
    have q_block != k_block in both directions: the edges of the past/diagonal split."""
    from .cases import global_selection

    sizes, skipped, taken = set(), 0, 0
    for _, case in SEL:
        if case.method != "random" or not case.causal:
            continue
        sel = global_selection(case)
        sizes.add((sel.q_block > sel.k_block, sel.q_block < sel.k_block))
        for b in range(sel.indices.shape[0]):
            for h in range(sel.indices.shape[1]):
                for i in range(sel.indices.shape[2]):
                    lo, hi = i * sel.q_block, (i + 1) * sel.q_block - 1  # the block's query positions
                    own = set(range(lo // sel.k_block, hi // sel.k_block + 1))
                    row = set(sel.indices[b, h, i].tolist()) - {-1}
                    skipped += not (own & row)
                    taken += bool(own & row)
    assert {(True, False), (False, True)} <= sizes, sizes
    assert skipped > 0 and taken > 0, (skipped, taken)


def _world1_selection_ring(device: str, backend: str, dtype: torch.dtype, T: int, qb: int, kb: int, causal: bool,
                           layout: str, want_kernel: str) -> None:
    """selection_ring_attention at world size 1 in this process (both local calls on `backend`)
    equals single-process attention under the same selection (2x rule)."""
    from attnkit.core import naive_attention
    from attnkit.core.selection import KVSelection
    from attnkit.distributed import CommStats, explain_selection_ring, selection_ring_attention, shard_selection

    from ..conftest import assert_close_rule

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
    try:
        g = torch.Generator().manual_seed(5)
        B, hq, hkv, d = 1, 4, 2, 16
        shapes = [(B, T, hq, d), (B, T, hkv, d), (B, T, hkv, d), (B, T, hq, d)]
        q, k, v, do = (torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)
        blocks = torch.rand(B, hq, T // qb, T // kb, generator=g) < 0.5
        sel = KVSelection.from_dense_blocks(blocks, qb, kb)
        local = [x.to(device=device, dtype=dtype) for x in (q, k, v, do)]  # world 1: the shard is the sequence
        ql, kl, vl = (x.clone().requires_grad_(True) for x in local[:3])
        lsel = shard_selection(KVSelection(sel.indices.to(device), qb, kb), 1, 0, layout, T)
        stats = CommStats()
        out = selection_ring_attention(ql, kl, vl, lsel, causal=causal, layout=layout, backend=backend, stats=stats)
        out.backward(local[3])
        assert list(stats.kernels) == [want_kernel], f"kernels used {stats.kernels}, expected {want_kernel}"
        assert stats.calls == (2 if causal else 1), stats
        told = explain_selection_ring(ql, kl, vl, lsel, 1, 0, causal=causal, layout=layout, backend=backend)
        assert told.kernels == stats.kernels and told.received_bytes == 0, told
        got = {"out": out.detach(), "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
        res = {}
        for cd in (torch.float64, None):
            xs = [x.to(dtype) for x in (q, k, v)]
            qs, ks, vs = (x.detach().clone().requires_grad_(True) for x in xs)
            o, _ = naive_attention(qs, ks, vs, causal=causal, selection=sel, compute_dtype=cd)
            o.backward(do.to(o.dtype))
            res[cd] = {"out": o.detach(), "dq": qs.grad, "dk": ks.grad, "dv": vs.grad}
        for key in got:
            assert_close_rule(got[key].cpu(), res[torch.float64][key], res[None][key], f"world-1 selection ring {key}")
    finally:
        if started:
            dist.destroy_process_group()


W1 = [(64, 16, 8, True, "zigzag"), (64, 16, 16, True, "contiguous"), (64, 16, 32, False, "contiguous")]


@pytest.mark.parametrize("T,qb,kb,causal,layout", W1, ids=[f"T{c[0]}-qb{c[1]}-kb{c[2]}-{c[4]}-causal{c[3]}" for c in W1])
def test_world1_selection_ring_triton_interpreter(T, qb, kb, causal, layout):
    """The GPU path's Triton kernels, run by the CPU interpreter at a tiny shape."""
    from attnkit import config, kernels
    from attnkit.core import availability

    reason = availability.triton()
    if reason:
        pytest.skip(f"Triton kernels not testable: {reason}")
    if not kernels.loaded():
        with config.triton_interpret_set():
            kernels.load()
    if not kernels.interpreted():
        pytest.skip("kernels were loaded for a GPU in this process (the GPU twin covers them)")
    _world1_selection_ring("cpu", "triton", torch.float32, T, qb, kb, causal, layout, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("causal,layout", [(True, "zigzag"), (False, "contiguous")])
def test_world1_selection_ring_gpu(causal, layout):
    """World 1 over NCCL: the dispatcher's fast sparse executor (not the reference) runs both calls."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (CPU twin: test_world1_selection_ring_triton_interpreter)")
    # blocks of 64: FlexAttention (blocks of 128) passes, Triton is the dispatcher's choice
    _world1_selection_ring("cuda", "auto", torch.bfloat16, 2048, 64, 64, causal, layout, "triton")
