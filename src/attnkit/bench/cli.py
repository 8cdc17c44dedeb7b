"""`attnkit bench`: the first slice. Runs every registered method on small inputs and prints, per
method, its error against exact attention and its median time. (The full benchmark, with
workloads, memory, reports and GPU presets, grows in this package.)"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small CPU inputs, every method (the default preset)")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    p.add_argument("--seqlen", type=int, default=512, help="sequence length T (default 512)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per method (median reported)")


def _fail(msg: str) -> int:
    print(f"attnkit bench: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    import attnkit as ak
    from attnkit.core.contract import validate_attention
    from attnkit.registry import get_method, methods

    if args.seqlen <= 0:
        return _fail(f"--seqlen: expected a positive int, got {args.seqlen}")
    if args.repeats <= 0:
        return _fail(f"--repeats: expected a positive int, got {args.repeats}")
    names = [m.name for m in methods()] if args.methods is None else [n.strip() for n in args.methods.split(",") if n.strip()]
    for n in names:
        try:
            get_method(n)
        except ak.AttnkitError as e:
            return _fail(str(e))
    torch.manual_seed(0)
    B, T, Hq, Hkv, D = 1, args.seqlen, 8, 2, 64
    q, k, v = torch.randn(B, T, Hq, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    exact = ak.ops.dense_attention(q, k, v, causal=True)
    print(f"attnkit bench (quick): B={B} T={T} Hq={Hq} Hkv={Hkv} D={D} float32 causal, {torch.get_num_threads()} CPU threads")
    print(f"{'method':<18} {'backend':<10} {'rel. error vs exact':>20} {'median ms':>10}")
    for name in names:
        spec = get_method(name)
        call = validate_attention(q, k, v, causal=True)
        opts = spec.example(call)
        backend = ak.explain(q, k, v, method=name, **opts).chosen
        times = []
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            out = ak.attention(q, k, v, method=name, **opts)
            times.append(time.perf_counter() - t0)
        out = out[0] if isinstance(out, tuple) else out
        if spec.family == "linear":
            err = "n/a (other model)"
        else:
            err = f"{((out - exact).norm() / exact.norm()).item():.3e}"
        print(f"{name:<18} {backend:<10} {err:>20} {1e3 * statistics.median(times[1:]):>10.2f}")
    return 0
