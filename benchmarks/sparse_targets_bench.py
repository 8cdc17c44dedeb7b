"""Every target of the selection engine on a GPU, in one run: end-to-end content-routed sparse
attention against cuDNN dense (selection included), the routing kernels in isolation, Quest decode.

For each T, on one shape (bf16, B = 1, Hq = 64, D = 128; Hkv = 4 for MoBA / NSA / block top-k and
1 for DSA, whose MLA-style attention is MQA), this times, in one process and one run:

- cuDNN SDPA dense causal attention (the baseline; GQA through `enable_gqa`), forward and
  forward+backward;
- `attnkit.attention(q, k, v, method, backend="auto", ...)` for `moba` (block 64, topk 16),
  `nsa` (block 64, topk 16, window 512, all three gated branches), `dsa` (topk 2048, indexer
  Hi = 4, Di = 64) and `block_topk` (block 128, topk 16): forward and forward+backward, which
  include the selection; plus the selection alone (`select_ms`);
- fla's `parallel_nsa` on the same NSA shape, when flash-linear-attention is installed.

Two more sections (`--routing`, `--quest`): at the longest T, MoBA's routing kernel against its score
GEMM alone (the floor of a fused selection) over a few launch configurations, and NSA's group kernel;
and Quest decode reading 1/8 of the pages at 128K (B = 8, Hq = 32, Hkv = 8) against dense decode
(`benchmarks/decode_bench.py`'s kernels section). The summary adds each method's selection share of
the forward and MoBA's effective TFLOP/s (visited query-key pairs only, selection excluded).

The crossover length of a method is the smallest measured T from which it is faster than the
dense baseline at every longer measured T. Times are medians of CUDA-event timings after warm-up
(fewer repetitions at long T). The JSON is rewritten after every row; `--plot` draws time versus T.

    PYTHONPATH=src python benchmarks/sparse_targets_bench.py --all-backends --routing --quest --plot \
        --out results/sparse_targets_h100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from attnkit.bench.timing import time_call

METHODS = {
    "moba": dict(block_size=64, topk=16),
    "nsa": dict(block_size=64, topk=16, window=512),
    "dsa": dict(topk=2048),
    "block_topk": dict(block_size=128, topk=16),
}
KV_HEADS = {"moba": 4, "nsa": 4, "dsa": 1, "block_topk": 4}


def cuda_time(fn: Callable[[], Any], warmup: int, reps: int) -> float:
    """Median milliseconds of `fn` by CUDA events (wall clock on the CPU, for smoke runs): the
    benchmark's own timer."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return time_call(fn, device, warmup=warmup, repeats=reps, budget_s=float("inf")).median_ms


def reps_for(T: int) -> tuple[int, int]:
    return (3, 10) if T <= 16384 else (1, 4)


def fwd_and_bwd(f: Callable[[], torch.Tensor], leaves: list[torch.Tensor], T: int) -> tuple[float, float]:
    warm, reps = reps_for(T)
    with torch.no_grad():
        t_f = cuda_time(f, warm, reps)

    def fb() -> None:
        out = f()
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    return t_f, cuda_time(fb, warm, reps)


def method_inputs(name: str, T: int, hq: int, d: int, dev: torch.device) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """q, k, v (leaves) and the method's options; gates and indexer tensors from its registry example."""
    import attnkit as ak
    from attnkit.core.contract import validate_attention

    hkv = KV_HEADS[name]
    torch.manual_seed(0)
    q = torch.randn(1, T, hq, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, T, hkv, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    spec = ak.registry.get_method(name)
    opts = dict(spec.example(validate_attention(q, k, v, causal=True)))
    opts.update(METHODS[name])
    if name == "dsa":  # the indexer at DeepSeek-V3.2-like proportions (Hi = 4 here, Di = 64)
        g = torch.Generator(device=dev).manual_seed(1)
        opts["q_idx"] = torch.randn(1, T, 4, 64, device=dev, dtype=torch.bfloat16, generator=g)
        opts["k_idx"] = torch.randn(1, T, 64, device=dev, dtype=torch.bfloat16, generator=g)
        opts["w"] = torch.randn(1, T, 4, device=dev, dtype=torch.bfloat16, generator=g)
    return [q, k, v], opts


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--max-minutes", type=float, default=7.0, help="stop starting rows after this")
    ap.add_argument("--all-backends", action="store_true",
                    help="a row per GPU backend of each method instead of backend='auto' (the dispatch table's data)")
    ap.add_argument("--no-fla", action="store_true", help="skip fla's parallel_nsa even if installed")
    ap.add_argument("--plot", action="store_true", help="also write <out>.png (time vs T)")
    ap.add_argument("--commit", default=None, help="the source commit measured (recorded in the JSON)")
    ap.add_argument("--routing", action="store_true", help="also time the routing kernels alone at the longest T")
    ap.add_argument("--quest", action="store_true", help="also time Quest decode at 128K (B=8, Hq=32, Hkv=8)")
    ap.add_argument("--out", default="results/sparse_targets_h100.json")
    ap.add_argument("--report", metavar="JSON",
                    help="measure nothing: summarise a results file (also one a time limit cut short), rewrite "
                         "it with the speed-ups, draw its plot and print the docs table")
    args = ap.parse_args(argv)
    if args.report:
        return report(args.report)

    import attnkit as ak
    from attnkit.bench import selection_time
    from attnkit.core.contract import validate_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    meta = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "command": " ".join(["python"] + sys.argv),
        "shape": {"B": 1, "Hq": args.heads, "D": args.head_dim, "Hkv": KV_HEADS, "dtype": "bf16", "causal": True},
        "options": METHODS, "timing": "median CUDA-event ms; warm-up/reps 3/10 up to 16K, 1/4 beyond",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": args.commit,
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    fla_nsa = None
    if not args.no_fla:
        try:
            import fla
            from fla.ops.nsa import parallel_nsa as fla_nsa

            meta["fla"] = getattr(fla, "__version__", "?")
        except Exception as e:  # fla is optional
            meta["fla"] = f"not available: {type(e).__name__}"
    rows: list[dict[str, Any]] = []

    def save() -> None:
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)

    def record(**row: Any) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()

    def attempt(label: dict[str, Any], body: Callable[[], dict[str, Any]]) -> None:
        if time.time() - t0 > 60 * args.max_minutes:
            record(**label, error="skipped: --max-minutes spent")
            return
        try:
            record(**label, **body())
        except Exception as e:  # an OOM or a failing backend is a row, not the end of the run
            record(**label, error=f"{type(e).__name__}: {e}"[:300])
        finally:
            torch.cuda.empty_cache()

    H, D = args.heads, args.head_dim
    if args.routing:  # first: short, and it compiles the routing kernels
        routing_rows(max(args.seqlens), H, D, dev, attempt)
    if args.quest:
        attempt(dict(T=131072, method="quest-decode", impl="decode_bench"), quest_rows)
    for T in args.seqlens:  # in the order given: the longest first keeps the headline rows inside --max-minutes
        for hkv in sorted({KV_HEADS[m] for m in args.methods}):
            def dense(hkv: int = hkv) -> dict[str, Any]:
                q = torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
                k, v = (torch.randn(1, hkv, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
                        for _ in range(2))

                def f() -> torch.Tensor:
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION if dev.type == "cuda" else SDPBackend.MATH]):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != H)

                t_f, t_fb = fwd_and_bwd(f, [q, k, v], T)
                flops = 2.0 * T * (T + 1) * D * H  # 4 * pairs * D, pairs = T(T+1)/2
                return dict(fwd_ms=t_f, fwd_bwd_ms=t_fb, fwd_tflops=flops / t_f / 1e9,
                            fwd_bwd_tflops=3.5 * flops / t_fb / 1e9)

            attempt(dict(T=T, method="dense", impl="sdpa-cudnn", Hkv=hkv), dense)

        for name in args.methods:
            gpu_backends = [b.name for b in ak.registry.get_method(name).backends if "cuda" in b.devices
                            and b.name != "reference"] if args.all_backends else ["auto"]
            for backend in gpu_backends:
                def run_method(name: str = name, backend: str = backend) -> dict[str, Any]:
                    leaves, opts = method_inputs(name, T, H, D, dev)
                    q, k, v = leaves
                    call = validate_attention(q, k, v, causal=True)
                    why = ak.explain(q, k, v, name, backend=backend, **opts)
                    f = lambda: ak.attention(q, k, v, name, backend=backend, **opts)  # noqa: E731
                    t_f, t_fb = fwd_and_bwd(f, leaves, T)
                    sel = selection_time.selection_fn(ak.registry.get_method(name), call, opts)
                    warm, reps = reps_for(T)
                    with torch.no_grad():
                        t_sel = cuda_time(sel, warm, reps) if sel is not None else None
                    return dict(fwd_ms=t_f, fwd_bwd_ms=t_fb, select_ms=t_sel, backend=why.chosen)

                impl = "attnkit" if backend == "auto" else f"attnkit-{backend}"
                attempt(dict(T=T, method=name, impl=impl, Hkv=KV_HEADS[name]), run_method)

            if name == "nsa" and fla_nsa is not None:
                def run_fla() -> dict[str, Any]:
                    leaves, opts = method_inputs("nsa", T, H, D, dev)
                    q, k, v = leaves
                    from attnkit.core import masks
                    from attnkit.ops.executors import run_flex_mask

                    # fla's window branch needs flash-attn (absent here): fla runs the compressed and
                    # selected branches, attnkit's flex kernel the window of 512, mixed by g_swa
                    def f() -> torch.Tensor:
                        o = fla_nsa(q, k, v, opts["g_cmp"], opts["g_slc"], None, block_counts=opts["topk"],
                                    block_size=opts["block_size"], window_size=0)
                        swa = run_flex_mask(validate_attention(q, k, v, causal=True), masks.sliding_window(opts["window"]))
                        return o + opts["g_swa"].unsqueeze(-1) * swa
                    t_f, t_fb = fwd_and_bwd(f, leaves, T)
                    return dict(fwd_ms=t_f, fwd_bwd_ms=t_fb)

                attempt(dict(T=T, method="nsa", impl="fla-parallel_nsa+flex-window", Hkv=4), run_fla)

    summarise(rows, meta)
    meta["total_s"] = round(time.time() - t0, 1)
    save()
    if args.plot:
        plot(rows, args.out.rsplit(".", 1)[0] + ".png", meta)
    return 0


def routing_rows(T: int, H: int, D: int, dev: torch.device, attempt: Callable) -> None:
    """MoBA's routing kernel (block 64, top 16, Hkv 4) against its score GEMM over every (row, block)
    pair, a few launch configurations; NSA's group kernel (its LSE given)."""
    from attnkit import kernels
    from attnkit.core.contract import validate_attention
    from attnkit.methods import nsa
    from attnkit.methods.gemm import split_half
    from attnkit.methods.router import block_mean, seq_view

    kernels.load()
    mod = kernels.load_module("selection.routed_topk")
    bs, topk, hkv = 64, 16, 4
    torch.manual_seed(0)
    q = torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, T, hkv, D, device=dev, dtype=torch.bfloat16)
    call = validate_attention(q, k, k, causal=True)
    view = seq_view(call)
    nk = T // bs
    means = block_mean(view.k, bs, view.k_len).permute(0, 2, 3, 1)
    gk = torch.cat(split_half(means, torch.bfloat16), dim=2).view(1, hkv, 3, D, nk).contiguous()
    warm, reps = reps_for(T)

    def gemm() -> dict[str, Any]:
        qa = q.view(T, hkv, H // hkv, D).permute(1, 2, 0, 3).reshape(hkv, -1, D)
        qa = torch.cat([qa] * 3, -1).contiguous()
        ga = gk.view(hkv, 3 * D, nk)
        return dict(ms=cuda_time(lambda: torch.bmm(qa, ga, out_dtype=torch.float32), warm, reps),
                    note="all T x nk pairs (no causal skip), 3 bf16 split terms, float32 out")

    attempt(dict(T=T, method="moba-routing", impl="score GEMM alone (cuBLAS)"), gemm)
    default = (mod.BLOCK_M, mod.MIN_BLOCK_N, mod.NUM_WARPS)
    for cfg in [default, (128, 32, 16), (256, 32, 8), (128, 64, 8), (64, 32, 4)]:
        def kern(cfg: tuple[int, int, int] = cfg) -> dict[str, Any]:
            mod.BLOCK_M, mod.MIN_BLOCK_N, mod.NUM_WARPS = cfg
            try:
                f = lambda: mod.routed_topk(q, gk, view.k_len, view.offset, True, bs, topk)  # noqa: E731
                return dict(ms=cuda_time(f, warm, reps), default=cfg == default)
            finally:
                mod.BLOCK_M, mod.MIN_BLOCK_N, mod.NUM_WARPS = default

        attempt(dict(T=T, method="moba-routing", impl="routed_topk BLOCK_M,BLOCK_N,warps=%d,%d,%d" % cfg), kern)

    def nsa_kernel() -> dict[str, Any]:
        with torch.no_grad():
            _, lse, _ = nsa.compressed_branch(call, bs, v=k, flex=True)
            kc = k.unflatten(1, (nk, bs)).float().mean(2).to(k.dtype).permute(0, 2, 3, 1)
            f = lambda: mod.group_prob_topk(q, kc, lse, view.k_len, nk, 0, True, bs, topk, call.scale)  # noqa: E731
            lse_ms = cuda_time(lambda: nsa.compressed_branch(call, bs, v=k, flex=True), warm, reps)
            return dict(ms=cuda_time(f, warm, reps), compressed_branch_ms=lse_ms)

    attempt(dict(T=T, method="nsa-routing", impl="group_prob_topk (LSE given)"), nsa_kernel)


def quest_rows() -> dict[str, Any]:
    """Quest at 1/8 of the pages vs dense decode at 128K, from `decode_bench.bench_kernels`."""
    import argparse as _ap
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).with_name("decode_bench.py")
    spec = importlib.util.spec_from_file_location("decode_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    ns = _ap.Namespace(seqlens=[131072], batch=8, hq=32, hkv=8, head_dim=128, page_size=16, dtype="bfloat16",
                       quest_fraction=8, warmup=5, reps=20, no_graphs=False, sweep=False, smoke=False)
    got = mod.bench_kernels(ns)
    keep = ("impl", "seconds", "selection_seconds", "speedup_vs_dense", "tb_per_s", "error")
    return dict(decode_rows=[{k: r[k] for k in keep if k in r} for r in got])


def moba_effective_tflops(T: int, H: int, D: int, block: int, topk: int, exec_ms: float) -> float:
    """Forward FLOP/s of MoBA's executor on the pairs it visits: per head, row i attends
    `min(topk, own + 1) - 1` full past blocks and its own block up to i (4 * pairs * D FLOPs)."""
    i = torch.arange(T, dtype=torch.float64)
    own = torch.div(i, block, rounding_mode="floor")
    pairs = ((torch.clamp(own + 1, max=topk) - 1) * block + (i - own * block + 1)).sum().item() * H
    return 4.0 * pairs * D / exec_ms / 1e9


def summarise(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Speed-ups over dense at each T and the crossover length per method, into `meta`."""
    dense = {(r["T"], r["Hkv"]): r for r in rows if r["method"] == "dense" and "fwd_ms" in r}
    summary: dict[str, Any] = {}
    for r in rows:
        if r["method"] == "dense" or "fwd_ms" not in r or (r["T"], r["Hkv"]) not in dense:
            continue
        d = dense[(r["T"], r["Hkv"])]
        key = f'{r["method"]}/{r["impl"]}'
        r["speedup_fwd"] = d["fwd_ms"] / r["fwd_ms"]
        r["speedup_fwd_bwd"] = d["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        summary.setdefault(key, {})[r["T"]] = {"fwd": round(r["speedup_fwd"], 3), "fwd_bwd": round(r["speedup_fwd_bwd"], 3)}
    cross = {}
    for key, per_t in summary.items():
        ts = sorted(per_t)
        wins = [t for i, t in enumerate(ts) if all(per_t[u]["fwd"] > 1.0 for u in ts[i:])]
        cross[key] = wins[0] if wins else None
    meta["speedup_over_dense"] = summary
    meta["crossover_T_fwd"] = cross
    share, eff = {}, {}
    for r in rows:
        if r.get("select_ms") and r.get("fwd_ms") and r["method"] in METHODS:
            share.setdefault(f'{r["method"]}/{r["impl"]}', {})[r["T"]] = round(r["select_ms"] / r["fwd_ms"], 3)
            if r["method"] == "moba":
                o = METHODS["moba"]
                eff.setdefault(r["impl"], {})[r["T"]] = round(moba_effective_tflops(
                    r["T"], meta["shape"]["Hq"], meta["shape"]["D"], o["block_size"], o["topk"],
                    r["fwd_ms"] - r["select_ms"]), 1)
    meta["selection_share_of_fwd"] = share
    meta["moba_executor_effective_tflops_fwd"] = eff


def table(rows: list[dict[str, Any]]) -> str:
    """The docs table: ms forward / forward+backward per method and T, selection time, speed-up over dense."""
    rows = [r for r in rows if r["method"] in METHODS or r["method"] == "dense"]
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]
    impls = {m: list(dict.fromkeys(r["impl"] for r in rows if r["method"] == m)) for m in methods}
    cols = [(m, i) for m in methods for i in impls[m]]
    head = ["T", "dense cuDNN fwd / fwd+bwd (Hkv 4; 1)"] + [f"{m} ({i})" for m, i in cols]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for T in sorted({r["T"] for r in rows}):
        at = [r for r in rows if r["T"] == T]
        dense = sorted((r for r in at if r["method"] == "dense" and "fwd_ms" in r), key=lambda r: -r["Hkv"])
        cells = [str(T), "; ".join(f'{r["fwd_ms"]:.2f} / {r["fwd_bwd_ms"]:.1f}' for r in dense) or "-"]
        for m, i in cols:
            r = next((r for r in at if r["method"] == m and r["impl"] == i), None)
            if r is None:
                cells.append("not run")
            elif "fwd_ms" not in r:
                cells.append("error: " + r.get("error", "?").split(":")[0])
            else:
                sel = f'sel {r["select_ms"]:.1f}; ' if r.get("select_ms") is not None else ""
                sp = (f'{r["speedup_fwd"]:.2f}x / {r["speedup_fwd_bwd"]:.2f}x' if "speedup_fwd" in r else "no dense row")
                cells.append(f'{r["fwd_ms"]:.1f} / {r["fwd_bwd_ms"]:.1f} ({sel}{sp})')
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def report(path: str) -> int:
    with open(path) as fh:
        data = json.load(fh)
    summarise(data["rows"], data["meta"])
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
    plot(data["rows"], path.rsplit(".", 1)[0] + ".png", data["meta"])
    print(table(data["rows"]))
    print("crossover (forward):", json.dumps(data["meta"]["crossover_T_fwd"]))
    return 0


def plot(rows: list[dict[str, Any]], path: str, meta: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in rows:
        if "fwd_ms" in r and "fwd_bwd_ms" in r:
            label = "dense cuDNN" + (f" (Hkv={r['Hkv']})" if r["method"] == "dense" else "") \
                if r["method"] == "dense" else f'{r["method"]} ({r["impl"]})'
            series.setdefault(label, []).append((r["T"], r["fwd_ms"], r["fwd_bwd_ms"]))
    for ax, col, title in ((axes[0], 1, "forward"), (axes[1], 2, "forward + backward")):
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[col] for p in pts], marker="o", label=label,
                    linestyle="--" if label.startswith("dense") else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel("ms")
        ax.set_title(f"{title}, selection included")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f'{meta["device"]}, bf16, B=1, Hq={meta["shape"]["Hq"]}, D={meta["shape"]["D"]}', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
