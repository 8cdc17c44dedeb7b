"""The routed selections alone on a GPU (bf16, B = 1, Hq = 64, D = 128): MoBA's fused gate + top-k
kernel over launch configurations against its score GEMM alone and the PyTorch tiles (Hkv = 4,
block 64, top 16); NSA's and DSA's selections (block 64 top 16 Hkv 4; top 2048 MQA, indexer Hi 4,
Di 64) through the kernels and through the PyTorch tiles.

Writes JSON after every row: `PYTHONPATH=src python benchmarks/selection_micro.py --out sel.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def bench(fn, reps: int = 5, warm: int = 1) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", type=int, nargs="+", default=[65536, 16384, 4096])
    ap.add_argument("--configs", nargs="+", default=["128,32,8", "128,32,16", "256,32,8", "128,64,8", "64,16,4"])
    ap.add_argument("--out", default="selection_micro.json")
    args = ap.parse_args()

    from attnkit import kernels
    import attnkit.methods.moba as moba
    from attnkit.core.contract import validate_attention
    from attnkit.methods.gemm import split_half
    from attnkit.methods.router import block_mean, seq_view

    kernels.load()
    new = kernels.load_module("selection.routed_topk")
    rows, meta = [], {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    meta["triton"] = triton.__version__

    def rec(**r):
        rows.append(r)
        print(json.dumps(r), flush=True)
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)

    H, HKV, D, BS, TOPK = 64, 4, 128, 64, 16
    for T in args.seqlens:
        torch.manual_seed(0)
        q = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, T, HKV, D, device="cuda", dtype=torch.bfloat16)
        view = seq_view(validate_attention(q, k, k, causal=True))
        nk = T // BS
        means = block_mean(view.k, BS, view.k_len).permute(0, 2, 3, 1)
        gk = torch.cat(split_half(means, torch.bfloat16), dim=2).view(1, HKV, 3, D, nk).contiguous()
        # the GEMM floor: every query row against every pooled block, 3 split terms, float32 out
        qa = q.view(T, HKV, H // HKV, D).permute(1, 2, 0, 3).reshape(HKV, -1, D)
        qa = torch.cat([qa] * 3, -1).contiguous()
        ga = gk.view(HKV, 3 * D, nk)
        try:
            rec(T=T, what="gemm_full_3terms", ms=bench(lambda: torch.bmm(qa, ga, out_dtype=torch.float32)))
        except Exception as e:
            rec(T=T, what="gemm_full_3terms", error=str(e)[:200])
        del qa
        ref = None
        for cfg in args.configs:
            bm, bn, nw = map(int, cfg.split(","))
            new.BLOCK_M, new.MIN_BLOCK_N, new.NUM_WARPS = bm, bn, nw
            f = lambda: new.routed_topk(q, gk, view.k_len, view.offset, True, BS, TOPK)  # noqa: E731
            try:
                t0 = time.time()
                out = f()
                torch.cuda.synchronize()
                compile_s = time.time() - t0
                if ref is None:
                    ref = out
                same = float((out == ref).all(-1).float().mean())
                rec(T=T, what="routed_topk", cfg=cfg, ms=bench(f), compile_s=round(compile_s, 1), same_rows_as_first=same)
            except Exception as e:
                rec(T=T, what="routed_topk", cfg=cfg, error=f"{type(e).__name__}: {e}"[:300])
        new.BLOCK_M, new.MIN_BLOCK_N, new.NUM_WARPS = 128, 32, 8
        rec(T=T, what="moba_policy_default", ms=bench(lambda: moba.select(q, k, block_size=BS, topk=TOPK)))
        if T <= 16384:
            from attnkit import config

            with config.override(routed_topk_devices=()):
                rec(T=T, what="moba_policy_pytorch_tiles",
                    ms=bench(lambda: moba.select(q, k, block_size=BS, topk=TOPK), reps=3))
        del gk, ref
        from attnkit import config
        from attnkit.methods import dsa, nsa

        def both(name, setting, fn):
            for label, devs in (("kernel", ("cuda",)), ("pytorch_tiles", ())):
                try:
                    with config.override(**{setting: devs}):
                        out = fn()
                        rec(T=T, what=f"{name}_{label}", ms=bench(fn, reps=3))
                    yield out
                except Exception as e:
                    rec(T=T, what=f"{name}_{label}", error=f"{type(e).__name__}: {e}"[:300])

        outs = list(both("nsa_select", "routed_topk_devices", lambda: nsa.select(q, k, block_size=BS, topk=TOPK).indices))
        if len(outs) == 2:
            rec(T=T, what="nsa_same_rows", frac=float((outs[0] == outs[1]).all(-1).float().mean()))
        del outs
        g = torch.Generator(device="cuda").manual_seed(1)
        ind = dict(q_idx=torch.randn(1, T, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g),
                   k_idx=torch.randn(1, T, 64, device="cuda", dtype=torch.bfloat16, generator=g),
                   w=torch.randn(1, T, 4, device="cuda", dtype=torch.bfloat16, generator=g))
        k1 = k[:, :, :1].contiguous()
        outs = list(both("dsa_select", "radix_topk_devices", lambda: dsa.select(q, k1, topk=2048, **ind).indices))
        if len(outs) == 2:
            a, b = outs
            rec(T=T, what="dsa_same_rows", frac=float((a == b).all(-1).float().mean()))
        del outs, q, k, k1
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
