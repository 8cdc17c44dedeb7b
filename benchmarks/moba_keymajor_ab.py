"""MoBA on the Triton executor, key-major vs query-major token mode, against cuDNN dense causal
attention, at the executor issue's shape (bf16, B = 1, Hq = 64, Hkv = 4, D = 128, block 64,
topk 16), in one process. Times the executor on a fixed selection, the selection alone, and the
method end to end (`attnkit.attention(..., "moba")`, selection included).

    PYTHONPATH=src python benchmarks/moba_keymajor_ab.py --seqlens 16384 65536 --out results/moba_keymajor_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from attnkit.bench.timing import time_call


def ms(fn: Callable[[], Any], T: int) -> float:
    warm, reps = (2, 5) if T <= 16384 else (1, 3)
    return time_call(fn, torch.device("cuda"), warmup=warm, repeats=reps, budget_s=float("inf")).median_ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip-query-major-above", type=int, default=32768,
                    help="the query-major path is ~0.5 s per forward at 64K: time it only up to this T")
    args = ap.parse_args()
    import attnkit as ak
    from attnkit import kernels
    from attnkit.methods import moba
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mod = kernels.load()
    H, Hkv, D, bs, topk = 64, 4, 128, 64, 16
    rows: list[dict[str, Any]] = []
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": dict(B=1, Hq=H, Hkv=Hkv, D=D,
            block_size=bs, topk=topk, dtype="bf16", causal=True), "timing": "median CUDA-event ms",
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    def save(**row: Any) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)

    for T in args.seqlens:
        g = torch.Generator(device="cuda").manual_seed(T)
        mk = lambda h: torch.randn(1, T, h, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()  # noqa: E731
        q, k, v = mk(H), mk(Hkv), mk(Hkv)
        leaves = [q, k, v]

        def fb(f: Callable[[], torch.Tensor]) -> Callable[[], None]:
            def go() -> None:
                o = f()
                o.backward(torch.ones_like(o))
                for t in leaves:
                    t.grad = None
            return go

        qd, kd, vd = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
        dense = lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)  # noqa: E731
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            with torch.no_grad():
                d_f = ms(dense, T)
            leaves_d = [qd, kd, vd]

            def dense_fb() -> None:
                o = dense()
                o.backward(torch.ones_like(o))
                for t in leaves_d:
                    t.grad = None
            d_fb = ms(dense_fb, T)
        save(T=T, impl="dense-sdpa-cudnn", fwd_ms=d_f, fwd_bwd_ms=d_fb)
        with torch.no_grad():
            sel_ms = ms(lambda: moba.select(q, k, block_size=bs, topk=topk), T)
            sel = moba.select(q, k, block_size=bs, topk=topk)
        save(T=T, impl="moba-selection", select_ms=sel_ms)
        for mode in ("1", "0"):
            if mode == "0" and T > args.skip_query_major_above:
                continue
            os.environ["ATTNKIT_SPARSE_KEYMAJOR"] = mode
            run = lambda: mod.sparse_attention(q, k, v, sel.indices, 1, bs, causal=True)[0]  # noqa: E731
            try:
                with torch.no_grad():
                    f_ms = ms(run, T)
                fb_ms = ms(fb(run), T)
                e2e = lambda: ak.attention(q, k, v, "moba", block_size=bs, topk=topk)  # noqa: E731
                with torch.no_grad():
                    e_f = ms(e2e, T)
                e_fb = ms(fb(e2e), T)
                save(T=T, impl="keymajor" if mode == "1" else "query-major", executor_fwd_ms=f_ms,
                     executor_fwd_bwd_ms=fb_ms, moba_fwd_ms=e_f, moba_fwd_bwd_ms=e_fb,
                     speedup_fwd_vs_dense=d_f / e_f, speedup_fwd_bwd_vs_dense=d_fb / e_fb)
            except Exception as e:  # record and go on
                save(T=T, impl="keymajor" if mode == "1" else "query-major", error=f"{type(e).__name__}: {e}"[:300])
            torch.cuda.empty_cache()
        os.environ.pop("ATTNKIT_SPARSE_KEYMAJOR", None)


if __name__ == "__main__":
    main()
