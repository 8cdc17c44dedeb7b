"""Context-parallel benchmark: ring attention against single-device attention, forward and forward+backward.

    PYTHONPATH=src python benchmarks/cp_bench.py --seqlens 16384,65536 --tests --out $OUT/cp_bench.json
    PYTHONPATH=src python benchmarks/cp_bench.py --device cpu --seqlens 256,512 --heads 4 --kv-heads 2 \
        --head-dim 32 --out /tmp/cp_cpu.json                                     # path check, gloo

World size 1 runs in this process (NCCL on CUDA, gloo on the CPU): it measures what the ring costs
on top of the local attention it wraps, which is what each rank pays at any world size. Larger
worlds are spawned (one GPU each when there are enough; else sharing GPUs over gloo with host
staging, a path check and no speed claim).

Per global length T: the baseline is single-device SDPA in the same run, forced onto cuDNN
attention (the target; `sdpa_cudnn`) and PyTorch's default choice (`sdpa_default`); then the
ring with each kernel in `--kernels` (`auto` is what `ring_attention` picks; `CommStats.kernels`
records it and why). Efficiency is `t_baseline(T) / (W * t_ring(T, W))`. Before timing, each
kernel's ring is checked against float32 single-process attention on a small input (max errors
recorded). `--tests` first runs the GPU-marked ring-block tests (tests/distributed/test_blocks.py)
and records their summary. The JSON (device, versions, commit, config) is rewritten after every row.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "src"))

from attnkit.bench.timing import time_call  # noqa: E402  (after the path insert)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time(fn: Callable[[], Any], warmup: int, iters: int, device: torch.device) -> float:
    """Median milliseconds of `fn()` over warm runs (CUDA events on a GPU): `attnkit.bench.timing`."""
    return time_call(fn, device, warmup=warmup, repeats=iters, budget_s=float("inf")).median_ms


def _inputs(args, T: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = DTYPES[args.dtype]
    q = torch.randn(args.batch, T, args.heads, args.head_dim, generator=g).to(device, dt)
    k = torch.randn(args.batch, T, args.kv_heads, args.head_dim, generator=g).to(device, dt)
    v = torch.randn(args.batch, T, args.kv_heads, args.head_dim, generator=g).to(device, dt)
    return q, k, v


def _sdpa(q, k, v, causal: bool) -> torch.Tensor:
    """[B, T, H, D] in and out; GQA by PyTorch's `enable_gqa`."""
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _baseline(args, T: int, device: torch.device, which: str) -> dict[str, Any]:
    """Single-device SDPA over the whole sequence: `cudnn` (forced) or `default` (PyTorch's pick)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (x.requires_grad_(True) for x in _inputs(args, T, device))
    do = torch.randn_like(q)
    row: dict[str, Any] = {"T": T, "baseline": f"sdpa_{which}"}
    if which == "cudnn":
        ctx: Callable[[], Any] = lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])  # noqa: E731
        try:
            with ctx():
                _sdpa(q, k, v, args.causal).backward(do)
            row["gqa"] = "enable_gqa"
        except RuntimeError:
            # cuDNN SDPA without native GQA here: expand K/V once, outside the timed region
            g = args.heads // args.kv_heads
            k, v = (x.detach().repeat_interleave(g, 2).requires_grad_(True) for x in (k, v))
            row["gqa"] = "kv expanded before timing"
    else:
        ctx = contextlib.nullcontext
        row["gqa"] = "enable_gqa"

    def fwd():
        with torch.no_grad(), ctx():
            _sdpa(q, k, v, args.causal)

    def fwd_bwd():
        with ctx():
            _sdpa(q, k, v, args.causal).backward(do)

    _peak_reset(device)
    row["fwd_ms"] = _time(fwd, args.warmup, args.iters, device)
    row["fwd_bwd_ms"] = _time(fwd_bwd, args.warmup, args.iters, device)
    row["peak_mib"] = _peak_mib(device)
    return row


def _check(args, rank: int, world: int, device: torch.device, kernel: str) -> dict[str, Any]:
    """Ring vs single-process float32 attention on a small input: max abs errors of out, dq, dk, dv."""
    from attnkit.distributed import CommStats, gather, ring_attention, shard

    T = 256 * world
    q, k, v = _inputs(args, T, device, seed=1)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device, q.dtype)
    q32, k32, v32 = (x.float().requires_grad_(True) for x in (q, k, v))
    o32 = _sdpa(q32, k32, v32, args.causal)
    o32.backward(do.float())
    ql, kl, vl = (shard(x, world, rank, args.layout).detach().requires_grad_(True) for x in (q, k, v))
    stats = CommStats()
    o = ring_attention(ql, kl, vl, causal=args.causal, layout=args.layout, backend=kernel, stats=stats)
    o.backward(shard(do, world, rank, args.layout))
    errs: dict[str, Any] = {"kernels": stats.kernels}
    staged = dist.get_backend() == "gloo" and device.type == "cuda"
    for name, got, want in (("out", o, o32), ("dq", ql.grad, q32.grad), ("dk", kl.grad, k32.grad),
                            ("dv", vl.grad, v32.grad)):
        part = got.detach().float()
        full = gather(part.cpu(), None, args.layout).to(device) if staged else gather(part, None, args.layout)
        errs[name] = (full - want.detach()).abs().max().item()
    # the same float32 reference computed in the input dtype by plain SDPA: the 2x rule's yardstick
    qb, kb, vb = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    ob = _sdpa(qb, kb, vb, args.causal)
    ob.backward(do)
    for name, got, want in (("out", ob, o32), ("dq", qb.grad, q32.grad), ("dk", kb.grad, k32.grad),
                            ("dv", vb.grad, v32.grad)):
        errs[f"sdpa_{name}"] = (got.detach().float() - want.detach()).abs().max().item()
    return errs


def _ring_row(args, rank: int, world: int, device: torch.device, T: int, kernel: str) -> dict[str, Any]:
    """Forward and forward+backward time of `ring_attention` on this rank, peak memory, bytes, kernels."""
    from attnkit.distributed import CommStats, ring_attention, shard

    q, k, v = _inputs(args, T, device)
    ql, kl, vl = (shard(x, world, rank, args.layout).contiguous().requires_grad_(True) for x in (q, k, v))
    del q, k, v
    do = torch.randn_like(ql)

    def fwd():
        with torch.no_grad():
            ring_attention(ql, kl, vl, causal=args.causal, layout=args.layout, backend=kernel)

    def fwd_bwd():
        ring_attention(ql, kl, vl, causal=args.causal, layout=args.layout, backend=kernel).backward(do)

    row: dict[str, Any] = {"T": T, "T_local": T // world, "kernel": kernel}
    try:
        dist.barrier()
        _peak_reset(device)
        row["fwd_ms"] = _time(fwd, args.warmup, args.iters, device)
        dist.barrier()
        row["fwd_bwd_ms"] = _time(fwd_bwd, args.warmup, args.iters, device)
        row["peak_mib"] = _peak_mib(device)
        stats = CommStats()
        ring_attention(ql, kl, vl, causal=args.causal, layout=args.layout, backend=kernel, stats=stats).backward(do)
        row.update(bytes_sent_forward=stats.forward_bytes, bytes_sent_backward=stats.backward_bytes,
                   steps=stats.steps, calls=stats.calls, kernels=stats.kernels)
    except Exception as e:  # noqa: BLE001 - recorded in the results, not hidden
        row["error"] = f"{type(e).__name__}: {e}"
    del ql, kl, vl, do
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _rank_run(args, rank: int, world: int, device: torch.device, T: int | None) -> dict[str, Any]:
    """One rank's part: the small-input checks (T None) or the timed rows of one length."""
    if T is None:
        out = {}
        for kernel in args.kernels:
            try:
                out[kernel] = _check(args, rank, world, device, kernel)
            except Exception as e:  # noqa: BLE001
                out[kernel] = {"error": f"{type(e).__name__}: {e}"}
        return out
    return {kernel: _ring_row(args, rank, world, device, T, kernel) for kernel in args.kernels}


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    """A spawned rank (world size > 1): every check and length, results to the parent's queue."""
    try:
        if args.device == "cuda":
            ngpu = torch.cuda.device_count()
            device = torch.device("cuda", rank % ngpu)
            torch.cuda.set_device(device)
            backend = "nccl" if world <= ngpu else "gloo"
        else:
            device, backend = torch.device("cpu"), "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        res = {"process_group": backend, "checks": _rank_run(args, rank, world, device, None),
               "rows": [_rank_run(args, rank, world, device, T) for T in args.seqlens]}
        queue.put((rank, res))
        dist.barrier()
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001
        queue.put((rank, {"error": f"{type(e).__name__}: {e}"}))


def _summary(world: int, T: int, kernel: str, ranks: list[dict], base: dict[str, dict]) -> dict[str, Any]:
    if any("error" in x for x in ranks):
        return {"world": world, "T": T, "kernel": kernel, "error": [x.get("error") for x in ranks]}
    row: dict[str, Any] = {"world": world, "T": T, "kernel": kernel, "kernels_used": ranks[0].get("kernels")}
    for key in ("fwd_ms", "fwd_bwd_ms"):
        slowest = max(x[key] for x in ranks)
        row[key] = slowest
        for name, b in base.items():
            row[f"{key[:-3]}_efficiency_vs_{name}"] = round(b[key] / (world * slowest), 4)
    row["peak_mib_per_rank"] = max((x["peak_mib"] or 0) for x in ranks) or None
    row["bytes_sent_forward"] = sum(x["bytes_sent_forward"] for x in ranks)
    row["steps"], row["calls_per_rank"] = ranks[0]["steps"], ranks[0]["calls"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--worlds", default="1", help="comma-separated world sizes (processes on this host)")
    p.add_argument("--seqlens", default="16384,65536", help="comma-separated global sequence lengths")
    p.add_argument("--kernels", default="auto,flash", help="ring kernels to time (auto, cudnn, flash, reference)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    p.add_argument("--non-causal", dest="causal", action="store_false")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tests", action="store_true", help="first run the GPU ring-block tests and record them")
    p.add_argument("--out", default="results/cp_bench.json")
    args = p.parse_args()
    args.seqlens = [int(x) for x in args.seqlens.split(",")]
    args.kernels = args.kernels.split(",")
    worlds = [int(x) for x in args.worlds.split(",")]
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("cp_bench: --device cuda needs CUDA (use --device cpu for a gloo path check)")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=ROOT).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = ""
    report: dict[str, Any] = {
        "benchmark": "cp_bench", "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "gpus": torch.cuda.device_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(), "commit": commit, "time": datetime.datetime.now().isoformat(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "tests": None, "checks": {}, "baseline": [], "ring": [], "per_rank": [],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    t0 = time.time()
    if args.tests:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-ra",
                               "tests/distributed/test_blocks.py"], capture_output=True, text=True, cwd=ROOT,
                              timeout=240, env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
        report["tests"] = {"returncode": proc.returncode, "tail": proc.stdout[-4000:] + proc.stderr[-2000:]}
        print(proc.stdout[-2500:], flush=True)
        save()

    base: dict[int, dict[str, dict]] = {}
    for T in args.seqlens:
        base[T] = {}
        for which in (("cudnn", "default") if device.type == "cuda" else ("default",)):
            try:
                row = _baseline(args, T, device, which)
                base[T][f"sdpa_{which}"] = row
            except Exception as e:  # noqa: BLE001
                row = {"T": T, "baseline": f"sdpa_{which}", "error": f"{type(e).__name__}: {e}"}
            report["baseline"].append(row)
            print(json.dumps(row), flush=True)
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    for world in worlds:
        if world == 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1, timeout=datetime.timedelta(seconds=120))
            report["checks"]["1"] = _rank_run(args, 0, 1, device, None)
            print(json.dumps({"world": 1, "checks": report["checks"]["1"]}), flush=True)
            save()
            for T in args.seqlens:
                res = _rank_run(args, 0, 1, device, T)
                for kernel in args.kernels:
                    row = _summary(1, T, kernel, [res[kernel]], base[T])
                    report["ring"].append(row)
                    print(json.dumps(row), flush=True)
                    save()
            dist.destroy_process_group()
            continue
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
        for pr in procs:
            pr.start()
        per_rank = dict(queue.get(timeout=600) for _ in range(world))
        for pr in procs:
            pr.join(60)
        report["per_rank"].append({"world": world, "ranks": [per_rank[r] for r in range(world)]})
        report["checks"][str(world)] = [per_rank[r].get("checks", per_rank[r].get("error")) for r in range(world)]
        for i, T in enumerate(args.seqlens):
            for kernel in args.kernels:
                ranks = [per_rank[r]["rows"][i][kernel] if "rows" in per_rank[r] else {"error": per_rank[r]["error"]}
                         for r in range(world)]
                row = _summary(world, T, kernel, ranks, base[T])
                report["ring"].append(row)
                print(json.dumps(row), flush=True)
        save()
    report["wall_s"] = round(time.time() - t0, 1)
    save()
    print(f"wrote {args.out} in {report['wall_s']} s")


if __name__ == "__main__":
    main()
