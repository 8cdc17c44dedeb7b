"""Selection-aware ring at world size 1 against the single-device sparse executor, fwd and fwd+bwd.

    PYTHONPATH=src python benchmarks/selection_ring_bench.py --tests --out $OUT/selection_ring.json
    PYTHONPATH=src python benchmarks/selection_ring_bench.py --device cpu --seqlens 256 --heads 4 --kv-heads 2 \
        --head-dim 32 --block 16 --topk 4 --out /tmp/selring_cpu.json          # path check, gloo

World size 1 runs in this process (NCCL on CUDA, gloo on the CPU), so it measures what the
selection ring's local computation (past-block and diagonal-block calls plus their LSE merge)
costs against one `ops.sparse_attention` call over the same selection. The selection is random:
each query block keeps its own block and `topk - 1` random earlier ones. Rows: the baseline
(`ops.sparse_attention`, `backend="auto"`), then the ring with each backend of `--backends`
(`CommStats.kernels` records what ran and why); `reference` only up to `--reference-max-t`.
Each ring row is first checked against the baseline on the same inputs (max errors recorded).
`--tests` first runs the GPU-marked selection-ring tests. The JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "src"))

from attnkit.bench.timing import time_call  # noqa: E402  (after the path insert)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _time(fn: Callable[[], Any], warmup: int, iters: int, device: torch.device) -> float:
    """Median milliseconds of `fn()` over warm runs (CUDA events on a GPU): `attnkit.bench.timing`."""
    return time_call(fn, device, warmup=warmup, repeats=iters, budget_s=float("inf")).median_ms


def _selection(args, T: int, device: torch.device):
    """Own block plus `topk - 1` random earlier blocks per query block and KV head."""
    from attnkit.core.selection import KVSelection

    n = T // args.block
    g = torch.Generator().manual_seed(1)
    score = torch.rand(1, args.kv_heads, n, n, generator=g)
    i = torch.arange(n)
    earlier = i.view(-1, 1) > i.view(1, -1)
    score = torch.where(earlier, score, torch.full_like(score, -1.0))
    top = score.topk(min(args.topk - 1, n), -1)
    chosen = torch.zeros(1, args.kv_heads, n, n, dtype=torch.bool)
    chosen.scatter_(-1, top.indices, top.values > 0)
    chosen |= torch.eye(n, dtype=torch.bool).view(1, 1, n, n)
    return KVSelection(KVSelection.from_dense_blocks(chosen, args.block, args.block).indices.to(device),
                       args.block, args.block)


def _row(args, T: int, device: torch.device, backend: str) -> dict[str, Any]:
    from attnkit.distributed import CommStats, selection_ring_attention, shard_selection
    from attnkit.ops import sparse_attention

    dtype = DTYPES[args.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(1, T, args.heads, args.head_dim), (1, T, args.kv_heads, args.head_dim),
              (1, T, args.kv_heads, args.head_dim), (1, T, args.heads, args.head_dim)]
    q, k, v, do = (torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes)
    sel = _selection(args, T, device)
    lsel = shard_selection(sel, 1, 0, "zigzag", T)
    row: dict[str, Any] = {"T": T, "backend": backend}
    if backend == "baseline":
        run = lambda q, k, v: sparse_attention(q, k, v, sel, causal=True)  # noqa: E731
    else:
        stats = CommStats()
        run = lambda q, k, v: selection_ring_attention(q, k, v, lsel, layout="zigzag", backend=backend,  # noqa: E731
                                                        stats=stats)
        with torch.no_grad():
            got, want = run(q, k, v), sparse_attention(q, k, v, sel, causal=True)
        row["max_err_vs_baseline"] = (got.float() - want.float()).abs().max().item()
        row["kernels"] = dict(stats.kernels)
        row["calls"] = stats.calls
    qs, ks, vs = (x.clone().requires_grad_(True) for x in (q, k, v))

    def fwd():
        with torch.no_grad():
            run(q, k, v)

    def fwd_bwd():
        run(qs, ks, vs).backward(do)

    row["fwd_ms"] = _time(fwd, args.warmup, args.iters, device)
    row["fwd_bwd_ms"] = _time(fwd_bwd, args.warmup, args.iters, device)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seqlens", default="4096,16384")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--backends", default="auto,reference")
    p.add_argument("--reference-max-t", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tests", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    device = torch.device(args.device)
    result: dict[str, Any] = {"config": vars(args), "torch": torch.__version__, "rows": [],
                              "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    if device.type == "cuda":
        result["device"] = torch.cuda.get_device_name(device)

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    if args.tests:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                               os.path.join(ROOT, "tests/distributed/test_selection_ring.py")],
                              capture_output=True, text=True, cwd=ROOT)
        result["tests"] = {"rc": proc.returncode, "tail": proc.stdout[-3000:] + proc.stderr[-2000:]}
        save()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=120))
    try:
        for T in (int(t) for t in args.seqlens.split(",")):
            for backend in ["baseline"] + args.backends.split(","):
                if backend == "reference" and T > args.reference_max_t:
                    continue
                try:
                    result["rows"].append(_row(args, T, device, backend))
                except Exception as e:  # recorded, so one failing row does not lose the others
                    result["rows"].append({"T": T, "backend": backend, "error": f"{type(e).__name__}: {e}"[:500]})
                print(json.dumps(result["rows"][-1]), flush=True)
                save()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
