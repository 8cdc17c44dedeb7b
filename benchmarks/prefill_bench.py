"""Speed of the training-free sparse prefill methods against cuDNN dense causal attention, selection included.

One shape (bf16, B = 1, Hq = 32, Hkv = 8, D = 128, causal), T = 32K, 64K, 128K by default, on
inputs of `attnkit.bench.workloads`, in this order: `concentrated` (the structured workload with
12 nats of locality: about 36 keys hold 90% of a query's attention at T = 8K, like the peaky heads
of pretrained LLMs), `structured` (4 nats of locality plus planted needles: attention spread over
thousands of keys) and `random` (flat attention, the worst case for coverage-based budgets). Per
workload and T, in one process:

- dense: SDPA forced onto cuDNN (`is_causal=True`, GQA through `enable_gqa`), forward;
- each method at its paper's default budget through `attnkit.attention(..., backend="auto")`:
  forward time (selection included), the selection alone (`select_ms`), the backend dispatch
  chose, the density of the selection (attended query-key pairs over the causal pairs, counting
  whole blocks) and the peak memory of the forward.

Times are medians of CUDA events after warm-up. The JSON (device, versions, commit, command) is
rewritten after every row; the end of the run adds the speed-ups over dense and, per method, the
crossover length (the smallest measured T from which it beats dense at every longer T).

    PYTHONPATH=src python benchmarks/prefill_bench.py --out $OUT/prefill_h100.json

CPU smoke run (reference backends, tiny T): `--device cpu --seqlens 256 512 --heads 4 --kv-heads 2 --head-dim 32`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

# the papers' default budgets (token_sparse's and hip's are attnkit's; see each method's docs page)
METHODS: dict[str, dict[str, Any]] = {
    "vertical_slash": dict(n_vertical=1000, n_slash=6096, n_last=64, block_size=64, sinks=30, window=100),
    "xattention": dict(block_size=128, stride=8, threshold=0.9),
    "xattention_s16": dict(block_size=128, stride=16, threshold=0.9),
    "flexprefill": dict(block_size=128, gamma=0.9, tau=0.1),
    "token_sparse": dict(coverage=0.9, n_last=64, sinks=4, window=64),
    "hip": dict(block_size=64, topk=32, sinks=1, local=1),
}


def method_name(label: str) -> str:
    return label.split("_s16")[0]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # not a git checkout
        return "unknown"


def timer(device: torch.device) -> Callable[[Callable[[], Any], int, int], float]:
    from attnkit.bench.timing import time_call

    def run(fn: Callable[[], Any], warmup: int, reps: int) -> float:
        return time_call(fn, device, warmup=warmup, repeats=reps, budget_s=float("inf")).median_ms

    return run


def reps_for(T: int) -> tuple[int, int]:
    return (2, 5) if T <= 65536 else (1, 3)


def density(sel: Any, T: int, hq: int) -> float:
    """Attended (query, key) pairs over the causal pairs, whole blocks counted (an upper bound)."""
    idx = sel.indices
    if sel.k_block == 1 and sel.q_block == T:  # token_sparse: each head attends causally among L' tokens
        kept = (idx >= 0).sum(-1).double()
        pairs = (kept * (kept + 1) / 2).sum()
    else:
        pairs = (idx >= 0).sum().double() * sel.q_block * sel.k_block * (hq // idx.shape[1])
    return float(pairs / (hq * T * (T + 1) / 2))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--workloads", nargs="+", default=["concentrated", "structured", "random"])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-minutes", type=float, default=7.0, help="stop starting rows after this")
    ap.add_argument("--out", default="results/prefill_h100.json")
    args = ap.parse_args(argv)

    import attnkit as ak
    from attnkit.bench.workloads import Shape, random_workload, structured_workload
    from attnkit.core.contract import validate_attention

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    clock = timer(dev)
    t0 = time.time()
    meta: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "commit": commit(), "command": " ".join(["python"] + sys.argv),
        "shape": {"B": 1, "Hq": args.heads, "Hkv": args.kv_heads, "D": args.head_dim, "dtype": str(dtype), "causal": True},
        "options": {m: METHODS[m] for m in args.methods}, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "timing": "median CUDA-event ms of the forward; warm-up/reps 2/5 up to 64K, 1/3 beyond",
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    rows: list[dict[str, Any]] = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save() -> None:
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)

    def attempt(label: dict[str, Any], body: Callable[[], dict[str, Any]]) -> None:
        if time.time() - t0 > 60 * args.max_minutes:
            row = {**label, "error": "skipped: --max-minutes spent"}
        else:
            try:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                row = {**label, **body()}
            except Exception as e:  # an OOM or a failing backend is a row, not the end of the run
                row = {**label, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()
        if cuda:
            torch.cuda.empty_cache()

    shape = Shape(batch=1, heads_q=args.heads, heads_kv=args.kv_heads, head_dim=args.head_dim)
    for wl in args.workloads:
        for T in args.seqlens:
            if wl == "random":
                w = random_workload(T, shape, dtype, dev)
            else:
                w = structured_workload(T, shape, dtype, dev, local_nats=12.0 if wl == "concentrated" else 4.0)
            q, k, v = w.q, w.k, w.v
            warm, reps = reps_for(T)

            def dense() -> dict[str, Any]:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
                kinds = [SDPBackend.CUDNN_ATTENTION] if cuda else [SDPBackend.MATH]

                def f() -> torch.Tensor:
                    with sdpa_kernel(kinds):
                        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)

                with torch.no_grad():
                    ms = clock(f, warm, reps)
                return dict(fwd_ms=ms, fwd_tflops=2.0 * T * (T + 1) * args.head_dim * args.heads / ms / 1e9,
                            peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)

            attempt(dict(T=T, workload=wl, method="dense", impl="sdpa-cudnn" if cuda else "sdpa-math"), dense)
            for label in args.methods:
                name, opts = method_name(label), METHODS[label]

                def run(name: str = name, opts: dict[str, Any] = opts) -> dict[str, Any]:
                    spec = ak.registry.get_method(name)
                    call = validate_attention(q, k, v, causal=True)
                    parsed = spec.options.parse(name, opts)
                    chosen = ak.explain(q, k, v, name, **opts).chosen
                    policy = getattr(ak.methods, name).policy
                    with torch.no_grad():
                        t_sel = clock(lambda: policy(call, parsed), warm, reps)
                        sel = policy(call, parsed)
                        dens = density(sel, T, args.heads)
                        del sel
                        if cuda:
                            torch.cuda.reset_peak_memory_stats()
                        t_f = clock(lambda: ak.attention(q, k, v, name, **opts), warm, reps)
                    return dict(fwd_ms=t_f, select_ms=t_sel, density=dens, backend=chosen,
                                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)

                attempt(dict(T=T, workload=wl, method=label, impl="attnkit"), run)
            del w, q, k, v
    summarise(rows, meta)
    meta["total_s"] = round(time.time() - t0, 1)
    save()
    print(table(rows))
    return 0


def summarise(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Speed-ups over dense at each (T, workload) and the crossover T per (method, workload), into `meta`."""
    dense = {(r["T"], r["workload"]): r for r in rows if r["method"] == "dense" and "fwd_ms" in r}
    per: dict[str, dict[int, float]] = {}
    for r in rows:
        d = dense.get((r["T"], r["workload"]))
        if r["method"] == "dense" or "fwd_ms" not in r or d is None:
            continue
        r["speedup_fwd"] = d["fwd_ms"] / r["fwd_ms"]
        per.setdefault(f'{r["method"]}/{r["workload"]}', {})[r["T"]] = round(r["speedup_fwd"], 3)
    cross = {}
    for key, sp in per.items():
        ts = sorted(sp)
        wins = [t for i, t in enumerate(ts) if all(sp[u] > 1.0 for u in ts[i:])]
        cross[key] = wins[0] if wins else None
    meta["speedup_fwd_over_dense"] = per
    meta["crossover_T_fwd"] = cross


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per (workload, T), dense ms and per method `fwd ms (selection ms; density; speed-up)`."""
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]
    head = ["workload", "T", "dense fwd ms"] + methods
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for wl in dict.fromkeys(r["workload"] for r in rows):
        for T in sorted({r["T"] for r in rows if r["workload"] == wl}):
            at = {r["method"]: r for r in rows if r["T"] == T and r["workload"] == wl}
            d = at.get("dense", {})
            cells = [wl, str(T), f'{d["fwd_ms"]:.1f}' if "fwd_ms" in d else d.get("error", "-")[:40]]
            for m in methods:
                r = at.get(m)
                if r is None:
                    cells.append("not run")
                elif "fwd_ms" not in r:
                    cells.append("error: " + r.get("error", "?")[:60])
                else:
                    sp = f'; {r["speedup_fwd"]:.2f}x' if "speedup_fwd" in r else ""
                    cells.append(f'{r["fwd_ms"]:.1f} (sel {r["select_ms"]:.1f}; dens {r["density"]:.2f}{sp})')
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
