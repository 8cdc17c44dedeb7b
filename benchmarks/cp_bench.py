"""Context-parallel benchmark: ring attention (and Ulysses) time, memory and scaling efficiency.

    python benchmarks/cp_bench.py --worlds 1,2 --seqlens 4096,16384 --out results/cp_h100.json

For each world size W (processes on this host, spawned here; one GPU each when there are enough,
else sharing GPUs over gloo with host staging, which checks the path but is no speed claim) and
each global length T it measures, per rank: forward and forward+backward time of
`ring_attention` (median of CUDA-event timings, warm) and peak memory. Baseline: one process
running PyTorch's flash SDPA over the whole sequence, in the same run. Scaling efficiency is
`t_single(T) / (W * t_ring(T, W))`: 1.0 means W ranks finish W times faster than one.
Before timing, every W checks the ring against single-process attention on a small input.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time_cuda(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of `fn()` over `iters` warm runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def _inputs(args, T: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = DTYPES[args.dtype]
    q = torch.randn(args.batch, T, args.heads, args.head_dim, generator=g).to(device, dt)
    k = torch.randn(args.batch, T, args.kv_heads, args.head_dim, generator=g).to(device, dt)
    v = torch.randn(args.batch, T, args.kv_heads, args.head_dim, generator=g).to(device, dt)
    return q, k, v


def _sdpa(q, k, v, causal: bool) -> torch.Tensor:
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def _check(args, rank: int, world: int, device: torch.device, group_backend: str) -> dict[str, Any]:
    """Ring vs single-process float32 attention on a small input: max errors of out, dq, dk, dv."""
    from attnkit.distributed import ring_attention, shard, gather

    T = 256 * world
    q, k, v = _inputs(args, T, device, seed=1)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device, q.dtype)
    q32, k32, v32 = (x.float().requires_grad_(True) for x in (q, k, v))
    o32 = _sdpa(q32, k32, v32, args.causal)
    o32.backward(do.float())
    ql, kl, vl = (shard(x, world, rank, args.layout).detach().requires_grad_(True) for x in (q, k, v))
    out = {}
    for backend in ("auto", "reference"):
        for x in (ql, kl, vl):
            x.grad = None
        o = ring_attention(ql, kl, vl, causal=args.causal, layout=args.layout, backend=backend)
        o.backward(shard(do, world, rank, args.layout))
        errs = {}
        for name, got, want in (("out", o, o32), ("dq", ql.grad, q32.grad), ("dk", kl.grad, k32.grad),
                                ("dv", vl.grad, v32.grad)):
            full = gather(got.detach().float(), None, args.layout) if group_backend != "gloo" or not got.is_cuda \
                else gather(got.detach().float().cpu(), None, args.layout).to(device)
            errs[name] = (full - want.detach()).abs().max().item()
        out[backend] = errs
    return out


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    try:
        ngpu = torch.cuda.device_count()
        device = torch.device("cuda", rank % ngpu)
        torch.cuda.set_device(device)
        backend = "nccl" if world <= ngpu else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        from attnkit.distributed import CommStats, ring_attention, shard

        res: dict[str, Any] = {"world": world, "process_group": backend,
                               "gpus_shared": world > ngpu, "check_max_abs_error": None, "rows": []}
        try:
            res["check_max_abs_error"] = _check(args, rank, world, device, backend)
        except Exception as e:  # noqa: BLE001 - recorded in the results, not hidden
            res["check_error"] = f"{type(e).__name__}: {e}"
        for T in args.seqlens:
            q, k, v = _inputs(args, T, device)
            ql, kl, vl = (shard(x, world, rank, args.layout).contiguous().requires_grad_(True) for x in (q, k, v))
            del q, k, v
            do = torch.randn_like(ql)
            stats = CommStats()

            def fwd():
                with torch.no_grad():
                    ring_attention(ql, kl, vl, causal=args.causal, layout=args.layout)

            def fwd_bwd():
                o = ring_attention(ql, kl, vl, causal=args.causal, layout=args.layout)
                o.backward(do)

            row: dict[str, Any] = {"T": T, "T_local": T // world}
            try:
                dist.barrier()
                torch.cuda.reset_peak_memory_stats(device)
                row["fwd_ms"] = _time_cuda(fwd, args.warmup, args.iters)
                row["fwd_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                dist.barrier()
                torch.cuda.reset_peak_memory_stats(device)
                row["fwd_bwd_ms"] = _time_cuda(fwd_bwd, args.warmup, args.iters)
                row["fwd_bwd_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                o = ring_attention(ql, kl, vl, causal=args.causal, layout=args.layout, stats=stats)
                o.backward(do)
                row["bytes_sent_forward"] = stats.forward_bytes
                row["bytes_sent_backward"] = stats.backward_bytes
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"
            res["rows"].append(row)
            del ql, kl, vl, do
            torch.cuda.empty_cache()
        queue.put((rank, res))
        dist.barrier()
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001
        queue.put((rank, {"error": f"{type(e).__name__}: {e}"}))


def _single(args) -> list[dict[str, Any]]:
    """One process, flash SDPA over the whole sequence: the baseline."""
    device = torch.device("cuda", 0)
    rows = []
    for T in args.seqlens:
        q, k, v = (x.requires_grad_(True) for x in _inputs(args, T, device))
        do = torch.randn_like(q)

        def fwd():
            with torch.no_grad():
                _sdpa(q, k, v, args.causal)

        def fwd_bwd():
            _sdpa(q, k, v, args.causal).backward(do)

        torch.cuda.reset_peak_memory_stats(device)
        row = {"T": T, "fwd_ms": _time_cuda(fwd, args.warmup, args.iters)}
        row["fwd_bwd_ms"] = _time_cuda(fwd_bwd, args.warmup, args.iters)
        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        rows.append(row)
        del q, k, v, do
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="1,2", help="comma-separated world sizes (processes on this host)")
    p.add_argument("--seqlens", default="4096,16384", help="comma-separated global sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    p.add_argument("--non-causal", dest="causal", action="store_false")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default="results/cp_bench.json")
    args = p.parse_args()
    args.seqlens = [int(x) for x in args.seqlens.split(",")]
    worlds = [int(x) for x in args.worlds.split(",")]
    if not torch.cuda.is_available():
        sys.exit("cp_bench: needs CUDA (the CPU path is covered by tests/distributed)")

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = ""
    report: dict[str, Any] = {
        "benchmark": "cp_bench", "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
        "device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
        "python": platform.python_version(), "commit": commit, "time": datetime.datetime.now().isoformat(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
    }
    t0 = time.time()
    report["single_gpu_sdpa"] = _single(args)
    base = {r["T"]: r for r in report["single_gpu_sdpa"]}
    report["ring"] = []
    ctx = mp.get_context("spawn")
    for world in worlds:
        queue = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
        for pr in procs:
            pr.start()
        per_rank = dict(queue.get(timeout=600) for _ in range(world))
        for pr in procs:
            pr.join(60)
        entry = {"world": world, "per_rank": [per_rank[r] for r in range(world)]}
        rows = []
        for i, T in enumerate(args.seqlens):
            ranks = [per_rank[r]["rows"][i] for r in range(world) if "rows" in per_rank[r]]
            if len(ranks) != world or any("error" in x for x in ranks):
                rows.append({"T": T, "error": [x.get("error") for x in ranks]})
                continue
            row = {"T": T}
            for key in ("fwd_ms", "fwd_bwd_ms"):
                slowest = max(x[key] for x in ranks)
                row[key] = slowest
                row[key.replace("_ms", "_efficiency")] = base[T][key] / (world * slowest)
            row["peak_mib_per_rank"] = max(x["fwd_bwd_peak_mib"] for x in ranks)
            rows.append(row)
        entry["summary"] = rows
        report["ring"].append(entry)
        print(json.dumps({"world": world, "summary": rows}, indent=1), flush=True)
    report["wall_s"] = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
