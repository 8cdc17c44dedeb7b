"""Micro-benchmark of the linear family's PyTorch chunked engine (`attnkit.linear.chunk`).

    PYTHONPATH=src python benchmarks/linear_micro.py                      # CUDA: T = 8192 32768, eager
    PYTHONPATH=src python benchmarks/linear_micro.py --compile            # + torch.compile(dynamic=False)
    PYTHONPATH=src python benchmarks/linear_micro.py --T 256 --H 2 --D 32 # CPU smoke run

Times `chunk_forward` itself (no validation, no fla) for the six methods, forward (no grad) and
forward + backward (o.backward with a fixed random gradient), B = 1, H = 16, K = V = 128, bf16
inputs on CUDA (float32 compute inside, as always), float32 on CPU unless --dtype says otherwise.
Timing: median of --reps CUDA-event timings after --warmup calls (perf_counter on CPU). Prints
one JSON line per (method, T, impl); with --compile the first call's time (compile included) is
reported as compile_s. The delta family gets L2-normalised q and k, as with
`use_qk_l2norm_in_kernel=True`; gates are `logsigmoid(N(0, 1)) / 16` (GLA's recipe).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from attnkit.bench.timing import time_call

from attnkit.linear.chunk import chunk_forward, state_group_size

METHODS = ["linear_attention", "simple_gla", "gla", "delta_rule", "gated_delta_rule", "kda"]
SCALAR_GATE = {"simple_gla", "gated_delta_rule"}
VECTOR_GATE = {"gla", "kda"}
DELTA = {"delta_rule", "gated_delta_rule", "kda"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def make_inputs(name: str, T: int, H: int, D: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    q, k, v = rnd(1, T, H, D), rnd(1, T, H, D), rnd(1, T, H, D)
    x: dict[str, Any] = {"g": None, "beta": None}
    if name in DELTA:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        x["beta"] = torch.sigmoid(rnd(1, T, H)).to(device, dtype)
    if name in SCALAR_GATE:
        x["g"] = (F.logsigmoid(rnd(1, T, H)) / 16).to(device, torch.float32)
    if name in VECTOR_GATE:
        x["g"] = (F.logsigmoid(rnd(1, T, H, D)) / 16).to(device, torch.float32)
    x.update(q=q.to(device, dtype), k=k.to(device, dtype), v=v.to(device, dtype))
    return x


def timeit(fn: Callable[[], Any], warmup: int, reps: int, cuda: bool) -> float:
    """Median milliseconds of `fn` after `warmup` calls (the benchmark's own timer: CUDA events on a GPU)."""
    device = torch.device("cuda" if cuda else "cpu")
    return time_call(fn, device, warmup=warmup, repeats=reps, budget_s=float("inf")).median_ms


def first_call_s(fn: Callable[[], Any], cuda: bool) -> float:
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_one(name: str, T: int, args: argparse.Namespace, impl: str, engine: Callable[..., Any]) -> dict[str, Any]:
    cuda = args.device == "cuda"
    D, C = args.D, args.chunk_size
    N = -(-T // C)
    G = state_group_size(N)
    row: dict[str, Any] = dict(method=name, impl=impl, T=T, B=1, H=args.H, K=D, V=D, dtype=args.dtype, chunk_size=C,
                               chunks=N, group_size=G, sequential_depth=(G - 1 + -(-N // G)) if name in DELTA else 0)
    x = make_inputs(name, T, args.H, D, DTYPES[args.dtype], args.device)
    scale = D ** -0.5

    def call() -> torch.Tensor:
        return engine(x["q"], x["k"], x["v"], x["g"], x["beta"], scale, None, C)[0]

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        if impl != "eager":
            row["compile_fwd_s"] = round(first_call_s(call, cuda), 2)
        row["fwd_ms"] = round(timeit(call, args.warmup, args.reps, cuda), 3)
    if cuda:
        row["fwd_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        torch.cuda.reset_peak_memory_stats()

    leaves = [t for t in (x["q"], x["k"], x["v"], x["g"], x["beta"]) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    do = torch.randn(1, T, args.H, D, generator=torch.Generator().manual_seed(1)).to(args.device, DTYPES[args.dtype])

    def fwd_bwd() -> None:
        call().backward(do)
        for t in leaves:
            t.grad = None

    if impl != "eager":
        row["compile_fwd_bwd_s"] = round(first_call_s(fwd_bwd, cuda), 2)
    row["fwd_bwd_ms"] = round(timeit(fwd_bwd, args.warmup, args.reps, cuda), 3)
    if cuda:
        row["fwd_bwd_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--D", type=int, default=128, help="K = V")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(chunk_forward, dynamic=False)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    ap.add_argument("--no-eager", action="store_true", help="with --compile: skip the eager timings")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    # fp32 matmuls stay fp32 (no TF32): the engine's accuracy is measured that way
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    meta = dict(kind="meta", torch=torch.__version__, python=platform.python_version(), device=args.device,
                device_name=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
                threads=torch.get_num_threads(), timing=f"median of {args.reps} after {args.warmup} warm-up calls, ms")
    print(json.dumps(meta), flush=True)
    impls: list[tuple[str, Callable[..., Any]]] = [] if (args.no_eager and args.compile) else [("eager", chunk_forward)]
    for T in args.T:
        for name in args.methods:
            runs = list(impls)
            if args.compile:
                torch._dynamo.reset()  # a fresh cache per shape and method: compile time is per row
                runs.append(("compile", torch.compile(chunk_forward, dynamic=False, mode=args.compile_mode)))
            for impl, engine in runs:
                try:
                    row = bench_one(name, T, args, impl, engine)
                except Exception as e:  # OOM, a compile failure: record it and go on
                    row = dict(method=name, impl=impl, T=T, error=f"{type(e).__name__}: {e}"[:400])
                print(json.dumps(row), flush=True)
                if args.device == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
