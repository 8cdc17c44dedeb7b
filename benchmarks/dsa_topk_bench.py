"""DSA's selection on a GPU: the tile path (indexer tiles + `torch.topk`) against the indexer fused with
its top-k (`kernels/selection/indexer_topk.py`), alone and end to end, with cuDNN dense in the same run.

Shape (as `sparse_targets_bench.py`'s DSA rows): bf16, B = 1, Hq = 64, Hkv = 1 (MQA), D = 128, causal,
top 2048; indexer Hi = 4, Di = 64. Per T this times cuDNN dense causal forward, then for each path
(`config` `dsa_fused_topk_devices` = () or ("cuda",)) the selection alone and `attnkit.attention(...,
"dsa")` forward; and how many rows the two paths select alike (the tile path breaks ties arbitrarily,
the fused one by index, so a few rows may differ by near-equal scores). Then, at the longest T, the
fused selection over a few launch configurations. Times are medians of CUDA events after warm-up.
The JSON is rewritten after every row.

    PYTHONPATH=src python benchmarks/dsa_topk_bench.py --out $OUT/dsa_topk_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from attnkit.bench.timing import time_call

CONFIGS = [  # (BLOCK_M, BLOCK_N, NUM_WARPS, EDGES); the first is the module's default
    None, (64, 128, 8, 16), (128, 64, 8, 16), (64, 64, 4, 8), (64, 128, 4, 32)]


def ms(fn: Callable[[], Any], T: int) -> dict[str, float]:
    warm, reps = (2, 10) if T <= 16384 else (1, 5)
    t = time_call(fn, torch.device("cuda"), warmup=warm, repeats=reps, budget_s=float("inf"))
    return {"ms": t.median_ms, "min_ms": t.min_ms, "max_ms": t.max_ms}


def inputs(T: int, hq: int, d: int) -> tuple[list[torch.Tensor], dict[str, Any]]:
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = mk(1, T, hq, d), mk(1, T, 1, d), mk(1, T, 1, d)
    opts = dict(topk=2048, q_idx=mk(1, T, 4, 64), k_idx=mk(1, T, 64), w=mk(1, T, 4))
    return [q, k, v], opts


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--no-sweep", action="store_true", help="skip the launch-configuration sweep")
    ap.add_argument("--max-minutes", type=float, default=3.5, help="stop starting rows after this")
    ap.add_argument("--out", default="results/dsa_topk_h100.json")
    args = ap.parse_args(argv)

    import triton

    import attnkit as ak
    from attnkit import config, kernels
    from attnkit.methods import dsa
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels.load()
    mod = kernels.load_module("selection.indexer_topk")
    t0 = time.time()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "command": " ".join(["python"] + sys.argv), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "shape": {"B": 1, "Hq": args.heads, "Hkv": 1, "D": args.head_dim, "dtype": "bf16", "causal": True,
                      "topk": 2048, "Hi": 4, "Di": 64},
            "fused_defaults": {n: getattr(mod, n) for n in ("BLOCK_M", "BLOCK_N", "NUM_WARPS", "EDGES", "SAMPLE",
                                                            "FLOAT_ROUNDS", "CAP_FACTOR")}}
    rows: list[dict[str, Any]] = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def record(**row: Any) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)

    def attempt(label: dict[str, Any], body: Callable[[], dict[str, Any]]) -> None:
        if time.time() - t0 > 60 * args.max_minutes:
            record(**label, error="skipped: --max-minutes spent")
            return
        try:
            record(**label, **body())
        except Exception as e:  # an OOM or a failing path is a row, not the end of the run
            record(**label, error=f"{type(e).__name__}: {e}"[:300])
        finally:
            torch.cuda.empty_cache()

    paths = {"tiles+torch.topk": (), "fused": ("cuda",)}
    for T in args.seqlens:
        leaves, opts = inputs(T, args.heads, args.head_dim)
        q, k, v = leaves

        def dense() -> dict[str, Any]:
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))

            def f() -> torch.Tensor:
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

            with torch.no_grad():
                return ms(f, T)

        attempt(dict(T=T, what="dense forward", impl="sdpa-cudnn"), dense)
        selections = {}
        for name, devices in paths.items():
            def select(devices: tuple[str, ...] = devices, name: str = name) -> dict[str, Any]:
                with config.override(dsa_fused_topk_devices=devices), torch.no_grad():
                    f = lambda: dsa.select(q, k, causal=True, **opts)  # noqa: E731
                    selections[name] = f().indices
                    return ms(f, T)

            def forward(devices: tuple[str, ...] = devices) -> dict[str, Any]:
                with config.override(dsa_fused_topk_devices=devices), torch.no_grad():
                    chosen = ak.explain(q, k, v, "dsa", **opts).chosen
                    return dict(**ms(lambda: ak.attention(q, k, v, "dsa", **opts), T), backend=chosen)

            attempt(dict(T=T, what="dsa selection", impl=name), select)
            attempt(dict(T=T, what="dsa forward", impl=name), forward)

        def agree() -> dict[str, Any]:
            a, b = (selections[n] for n in paths)
            same = (a == b).all(-1)
            return dict(rows_identical=float(same.float().mean()), rows=int(same.numel()))

        def rounds() -> dict[str, Any]:
            got: list[torch.Tensor] = []
            with torch.no_grad():
                mod.indexer_topk(opts["q_idx"], opts["k_idx"], opts["w"].float(), torch.tensor([T], device="cuda"),
                                 0, True, opts["topk"], rounds=got)
            r = torch.cat([x.flatten() for x in got]).float()
            return dict(rounds_mean=float(r.mean()), rounds_max=int(r.max()), programs=int(r.numel()),
                        note="counting rounds per program; each round and the compaction recompute the scores")

        attempt(dict(T=T, what="fused counting rounds", impl="fused"), rounds)
        if len(selections) == 2:
            attempt(dict(T=T, what="selections agree", impl="fused vs tiles"), agree)
        del leaves, opts, q, k, v, selections

    if not args.no_sweep:
        T = max(args.seqlens)
        leaves, opts = inputs(T, args.heads, args.head_dim)
        default = tuple(getattr(mod, n) for n in ("BLOCK_M", "BLOCK_N", "NUM_WARPS", "EDGES"))
        for cfg in CONFIGS:
            cfg = cfg or default

            def sweep(cfg: tuple[int, int, int, int] = cfg) -> dict[str, Any]:
                try:
                    mod.BLOCK_M, mod.BLOCK_N, mod.NUM_WARPS, mod.EDGES = cfg
                    with config.override(dsa_fused_topk_devices=("cuda",)), torch.no_grad():
                        return ms(lambda: dsa.select(leaves[0], leaves[1], causal=True, **opts), T)
                finally:
                    mod.BLOCK_M, mod.BLOCK_N, mod.NUM_WARPS, mod.EDGES = default

            attempt(dict(T=T, what="fused selection sweep", impl="BLOCK_M,BLOCK_N,warps,EDGES=%d,%d,%d,%d" % cfg,
                         default=cfg == default), sweep)
    meta["summary"] = summary(rows)
    meta["total_s"] = round(time.time() - t0, 1)
    record(what="done", total_s=meta["total_s"])
    return 0


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per T and path: forward speed-up over cuDNN dense and the selection's share of the forward."""
    out: dict[str, Any] = {}
    for T in sorted({r["T"] for r in rows if "T" in r}):
        at = {(r["what"], r.get("impl")): r.get("ms") for r in rows if r.get("T") == T}
        dense = at.get(("dense forward", "sdpa-cudnn"))
        for impl in ("tiles+torch.topk", "fused"):
            fwd, sel = at.get(("dsa forward", impl)), at.get(("dsa selection", impl))
            if fwd and dense:
                out.setdefault(str(T), {})[impl] = {
                    "fwd_ms": round(fwd, 2), "speedup_fwd_vs_dense": round(dense / fwd, 3),
                    "selection_share": round(sel / fwd, 3) if sel else None}
    return out


if __name__ == "__main__":
    sys.exit(main())
