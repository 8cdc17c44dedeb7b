"""What each spawned rank runs: every case of its world size, results saved for the parent."""

from __future__ import annotations

import datetime
import os
import time
import traceback

import torch
import torch.distributed as dist

from .cases import CASES, Case

TIMEOUT_S = 60  # every collective fails after this instead of hanging


def _gather(x: torch.Tensor, case: Case, world: int, rank: int) -> torch.Tensor:
    from attnkit.distributed import hybrid_unshard, unshard

    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    if case.op == "hybrid":
        return hybrid_unshard(parts, world // case.ulysses_size, case.ulysses_size, case.layout)
    return unshard(parts, case.layout)


def _run_case(case: Case, world: int, rank: int, hybrid_groups: dict) -> dict:
    import attnkit.distributed as cp

    q, k, v, do = case.inputs()
    if case.op == "hybrid":
        R, U = world // case.ulysses_size, case.ulysses_size
        pieces = [cp.hybrid_shard(x, R, U, rank, case.layout) for x in (q, k, v, do)]
    else:
        pieces = [cp.shard(x, world, rank, case.layout) for x in (q, k, v, do)]
    ql, kl, vl = (x.clone().requires_grad_(True) for x in pieces[:3])
    stats = cp.CommStats()
    if case.op == "ring":
        out = cp.ring_attention(ql, kl, vl, causal=case.causal, layout=case.layout, window=case.window,
                                sinks=case.sinks, cu_seqlens=case.cu(), stats=stats)
    elif case.op == "selection":
        from attnkit.distributed.selection_ring import selection_ring_attention, shard_selection

        from .cases import global_selection

        sel = shard_selection(global_selection(case), world, rank, case.layout, ql.shape[1])
        out = selection_ring_attention(ql, kl, vl, sel, causal=case.causal, layout=case.layout, stats=stats)
    elif case.op == "ulysses":
        gates = {name: cp.shard(g, world, rank, case.layout) for name, g in case.gate_tensors().items()}
        out = cp.ulysses_attention(ql, kl, vl, method=case.method, causal=case.causal, layout=case.layout,
                                   stats=stats, option_layout={name: "heads" for name in gates}, **case.options,
                                   **gates)
    elif case.op == "hybrid":
        if case.ulysses_size not in hybrid_groups:
            hybrid_groups[case.ulysses_size] = cp.hybrid_groups(case.ulysses_size)
        out = cp.hybrid_attention(ql, kl, vl, hybrid_groups[case.ulysses_size], causal=case.causal,
                                  layout=case.layout, window=case.window, sinks=case.sinks, cu_seqlens=case.cu(),
                                  stats=stats)
    else:
        raise ValueError(case.op)
    out.backward(pieces[3])
    sent = [stats.forward_bytes, stats.backward_bytes]
    if case.op == "ring":  # the plan's prediction for this rank, made without communicating
        plan = cp.explain_ring(ql, kl, vl, world, rank, causal=case.causal, layout=case.layout, window=case.window,
                               sinks=case.sinks, cu_seqlens=case.cu())
        sent += [plan.forward_bytes, plan.backward_bytes]
    if case.op == "selection":  # what this rank receives and runs, predicted without communicating
        told = cp.explain_selection_ring(ql, kl, vl, sel, world, rank, causal=case.causal, layout=case.layout)
        sent += [told.received_bytes]
    sent = torch.tensor(sent, dtype=torch.int64)
    dist.all_reduce(sent)
    res = {"bytes_forward": int(sent[0]), "bytes_backward": int(sent[1]), "steps": stats.steps,
           "skipped_steps": stats.skipped_steps,
           "calls": stats.calls, "kernels": dict(stats.kernels)}
    if case.op == "selection":
        res.update(predicted_forward=int(sent[2]), predicted_kernels=dict(told.kernels))
    if case.op == "ring":
        res.update(predicted_forward=int(sent[2]), predicted_backward=int(sent[3]), predicted_steps=plan.steps,
                   predicted_calls=plan.calls)
    for key, t in (("out", out), ("dq", ql.grad), ("dk", kl.grad), ("dv", vl.grad)):
        res[key] = _gather(t.detach(), case, world, rank)
    return res


def _run_error_case(case: Case, world: int, rank: int) -> dict:
    """Every rank calls; one passes a bad shard (or heads are too few): each must raise, none hang."""
    import attnkit.distributed as cp

    q, k, v, _ = case.inputs()
    ql, kl, vl = (cp.shard(x, world, rank, case.layout) for x in (q, k, v))
    bad_rank = world - 1
    try:
        if case.op == "bad_shard":
            if rank == bad_rank:
                ql, kl, vl = (x[:, : x.shape[1] - 2] for x in (ql, kl, vl))
            cp.ring_attention(ql, kl, vl, causal=True, layout=case.layout)
        elif case.name == "gate_without_layout":
            gate = cp.shard(torch.rand(q.shape[:3], dtype=q.dtype), world, rank, case.layout)
            cp.ulysses_attention(ql, kl, vl, causal=True, layout=case.layout, method="nsa", block_size=4, topk=2,
                                 g_cmp=gate)
        else:
            cp.ulysses_attention(ql, kl, vl, causal=True, layout=case.layout)
    except Exception as e:  # noqa: BLE001 - the test inspects type and message
        return {"raised": type(e).__name__, "message": str(e), "bad_rank": bad_rank}
    return {"raised": None, "message": "", "bad_rank": bad_rank}


def main(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, None, is_master=False,
                          timeout=datetime.timedelta(seconds=TIMEOUT_S))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    results: dict = {}
    hybrid_groups: dict = {}
    try:
        for case in CASES[world]:
            started = time.perf_counter()
            try:
                if case.op in ("bad_shard", "few_heads"):
                    results[case.name] = _run_error_case(case, world, rank)
                else:
                    results[case.name] = _run_case(case, world, rank, hybrid_groups)
            except Exception:  # noqa: BLE001 - reported by the parent's test for this case
                results[case.name] = {"error": traceback.format_exc()}
            results[case.name]["seconds"] = time.perf_counter() - started
            torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
