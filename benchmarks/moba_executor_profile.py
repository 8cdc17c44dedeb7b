"""Where the MoBA executor's time goes: each phase of the key-major forward and backward timed on
its own (entry list, pass a, the LSE reduction, pass c, the cast; delta, entry list, the backward
kernel, the cast), for `kernels/sparse/keymajor.py`, for `kernels/sparse/keymajor_windowed.py` at
several window and grid sizes (pass c also timed with plain stores instead of atomics, to price
them) and for the one-pass forward `kernels/sparse/keymajor_onepass.py` (entry list, bounds, the
pass, the division), with the executor end to end and cuDNN dense causal attention in the same run.

Shape (the executor issue's): bf16, B = 1, Hq = 64, Hkv = 4, D = 128, causal, MoBA block 64, top 16,
random inputs, MoBA's own selection (computed once per length, not timed). Effective TFLOP/s count
the visited (query, key) pairs only: forward 4 * pairs * D, backward 10 * pairs * D. Times are
medians of CUDA events (min and max kept); the JSON is rewritten after every row. Last, per length,
`attnkit.attention(..., method="moba")` forward (selection included) with each variant's defaults.

    PYTHONPATH=src python benchmarks/moba_executor_profile.py --out $OUT/moba_exec.json
    PYTHONPATH=src python benchmarks/moba_executor_profile.py --device cpu --out /tmp/moba_exec_cpu.json

On the CPU the kernels run in Triton's interpreter at tiny shapes (a check that the script runs,
not a measurement).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from attnkit import config, kernels
from attnkit.bench.env import device_info, git_commit, timestamp, versions
from attnkit.bench.timing import time_call

GPU_DEFAULTS = dict(seqlens=[16384, 65536], heads=64, kv_heads=4, dim=128, block=64, topk=16,
                    windows=[0, 512, 1024, 2048, 4096], programs_per_sm=[2, 1, 4], fwd_block_m=[64])
CPU_DEFAULTS = dict(seqlens=[40], heads=4, kv_heads=1, dim=16, block=16, topk=3, windows=[0, 16],
                    programs_per_sm=[2], fwd_block_m=[32])


def visited_pairs(idx: torch.Tensor, block: int, tq: int) -> int:
    """(query, key) pairs a causal per-token selection visits: `idx [1, Hq, Tq, S]`, -1 padded."""
    t = torch.arange(tq, device=idx.device).view(1, 1, tq, 1)
    b = idx.long()
    n = (t - b * block + 1).clamp(0, block)
    return int(torch.where(b >= 0, n, 0).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--seqlens", type=int, nargs="+")
    ap.add_argument("--windows", type=int, nargs="+", help="WINDOW values of the windowed variant (0: one window)")
    ap.add_argument("--programs-per-sm", type=int, nargs="+",
                    help="persistent grid sizes of the windowed variant: the first with every window, the others "
                         "with the window 1024")
    ap.add_argument("--fwd-block-m", type=int, nargs="*",
                    help="other forward BLOCK_M values of the windowed variant (window 1024; default 128)")
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--dim", type=int)
    ap.add_argument("--block", type=int)
    ap.add_argument("--topk", type=int)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-backward", action="store_true")
    args = ap.parse_args()
    defaults = GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, val in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        with config.triton_interpret_set():
            mod = kernels.load()
    else:
        mod = kernels.load()
    import attnkit as ak

    km, kw, op = mod.keymajor, mod.keymajor_windowed, mod.keymajor_onepass
    H, Hkv, D, bs, topk = args.heads, args.kv_heads, args.dim, args.block, args.topk
    meta = {"device": device_info(dev), "versions": versions(), "git": git_commit(), "time": timestamp(),
            "shape": dict(B=1, Hq=H, Hkv=Hkv, D=D, block_size=bs, topk=topk, dtype="bf16", causal=True),
            "timing": "median ms (CUDA events on cuda), min/max kept", "args": vars(args),
            "flops": "fwd 4 * pairs * D, bwd 10 * pairs * D (visited pairs only)"}
    rows: list[dict[str, Any]] = []

    def save(**row: Any) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)

    def timed(fn: Callable[[], Any], T: int) -> dict[str, float]:
        warm, reps = (1, 2) if dev.type == "cpu" else ((2, args.repeats) if T <= 16384 else (1, args.repeats))
        with kernels.launch_env():
            t = time_call(fn, dev, warmup=warm, repeats=reps, budget_s=5.0)
        return {"ms": round(t.median_ms, 4), "min_ms": round(t.min_ms, 4), "max_ms": round(t.max_ms, 4),
                "runs": t.runs}

    knob_defaults = (kw.WINDOW, kw.BWD_WINDOW, kw.PROGRAMS_PER_SM, kw.FWD_BLOCK_M)
    t_start = time.time()
    for T in args.seqlens:
        g = torch.Generator(device=dev).manual_seed(T)
        q, k, v = (torch.randn(1, T, h, D, device=dev, dtype=torch.bfloat16, generator=g) for h in (H, Hkv, Hkv))
        do = torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16, generator=g)
        scale = D ** -0.5

        # dense baseline
        qd, kd, vd = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        dense = lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)  # noqa: E731

        def dense_fb() -> None:
            o = dense()
            o.backward(do.transpose(1, 2))
            qd.grad = kd.grad = vd.grad = None

        if dev.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ctx, name = sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), "dense-sdpa-cudnn"
        else:
            import contextlib

            ctx, name = contextlib.nullcontext(), "dense-sdpa"
        with ctx:
            with torch.no_grad():
                d_f = timed(dense, T)
            d_fb = timed(dense_fb, T)
        save(T=T, impl=name, phase="fwd", **d_f)
        save(T=T, impl=name, phase="fwd+bwd", **d_fb)
        del qd, kd, vd

        sel = ak.methods.moba.select(q, k, block_size=bs, topk=topk)
        idx = sel.indices.to(torch.int32).contiguous()  # [1, Hq, T, S]
        pairs = visited_pairs(idx, bs, T)
        save(T=T, impl="selection", phase="stats", pairs=pairs, entries=int((idx >= 0).sum()),
             fwd_tflop=4 * pairs * D / 1e12)
        qp, kp, vp, dop = (x.reshape(T, x.shape[2], D) for x in (q, k, v, do))
        cu = torch.tensor([0, T], dtype=torch.int32, device=dev)
        ref_out = None

        # (name, sparse_keymajor_variant, forward-phase module, backward-phase module, windowed knobs)
        pps, wdef = args.programs_per_sm, 1024
        variants: list[tuple[str, str, Any, Any, Any]] = [("keymajor", "sorted", km, km, None)]
        variants += [(f"windowed-W{w}-P{pps[0]}", "windowed", kw, kw, (w, pps[0], 128)) for w in args.windows]
        variants += [(f"windowed-W{wdef}-P{p}", "windowed", kw, kw, (wdef, p, 128)) for p in pps[1:]]
        variants += [(f"windowed-W{wdef}-P{pps[0]}-M{m}", "windowed", kw, kw, (wdef, pps[0], m))
                     for m in args.fwd_block_m]
        variants += [(f"onepass-W{wdef}-P{pps[0]}", "onepass", op, kw, (wdef, pps[0], 128))]
        for vname, setting, vmod, bmod, knobs in variants:
            if knobs is not None:
                kw.WINDOW, kw.PROGRAMS_PER_SM, kw.FWD_BLOCK_M = knobs
                kw.BWD_WINDOW = kw.WINDOW
            with config.override(sparse_keymajor=True, sparse_keymajor_variant=setting):
                # phases of the forward, each timed on its own over the state the earlier ones left
                with kernels.launch_env():
                    fph = vmod.forward_phases(qp, kp, vp, idx, cu, cu, T, T, 1, bs, True, scale)
                    st = km.run_phases(fph)
                    torch.cuda.synchronize() if dev.type == "cuda" else None
                ent = st["ent"]
                save(T=T, impl=vname, phase="entries_stats", valid_entries=int(ent.off[-1]), cells=ent.cells,
                     work_items=int(ent.woff[-1]))
                if "unsafe" in st:  # the one-pass forward: rows whose bound was too loose (they force a fallback)
                    save(T=T, impl=vname, phase="bound_stats", unsafe_rows=int(st["unsafe"].sum()))
                for pname, step in fph:
                    save(T=T, impl=vname, phase=f"fwd:{pname}", **timed(lambda: step(st), T))
                if vmod is not op:
                    # diagnostic: pass c with plain stores instead of atomic adds (wrong sums; its time only)
                    with kernels.launch_env():
                        diag = dict(vmod.forward_phases(qp, kp, vp, idx, cu, cu, T, T, 1, bs, True, scale,
                                                        out_atomic=False))["pass_c"]
                    save(T=T, impl=vname, phase="fwd:pass_c_stores_not_atomics",
                         **timed(lambda: diag(dict(st)), T))
                out_p, lse_p = st["out"], st["lse"]
                if ref_out is None:
                    ref_out, ref_lse = out_p.float(), lse_p
                diff = (out_p.float() - ref_out).abs().max().item()
                fin = torch.isfinite(ref_lse)
                ldiff = (lse_p[fin] - ref_lse[fin]).abs().max().item() if bool(fin.any()) else 0.0
                save(T=T, impl=vname, phase="check_vs_keymajor", max_abs_out=diff, max_abs_lse=ldiff)
                if not args.no_backward:
                    delta = mod.backward_delta(dop, out_p, lse_p, None)
                    save(T=T, impl=vname, phase="bwd:delta",
                         **timed(lambda: mod.backward_delta(dop, out_p, lse_p, None), T))
                    with kernels.launch_env():
                        bph = bmod.backward_phases(dop, qp, kp, vp, lse_p, delta, idx, cu, cu, T, T, 1, bs, True,
                                                   scale)
                        bst = km.run_phases(bph)
                    for pname, step in bph:
                        save(T=T, impl=vname, phase=f"bwd:{pname}", **timed(lambda: step(bst), T))
                    del bst, delta
                del st, fph, ent, out_p, lse_p

                # end to end through the custom op (what attention() runs after the selection)
                with torch.no_grad():
                    r = timed(lambda: mod.sparse_attention(q, k, v, idx, 1, bs, causal=True), T)
                save(T=T, impl=vname, phase="fwd", eff_tflops=round(4 * pairs * D / (r["ms"] * 1e9), 2), **r)
                if not args.no_backward:
                    leaves = [x.clone().requires_grad_() for x in (q, k, v)]

                    def fb() -> None:
                        o, _ = mod.sparse_attention(*leaves, idx, 1, bs, causal=True)
                        o.backward(do)
                        for x in leaves:
                            x.grad = None

                    r = timed(fb, T)
                    save(T=T, impl=vname, phase="fwd+bwd", eff_tflops=round(14 * pairs * D / (r["ms"] * 1e9), 2),
                         **r)
                    del leaves
            if dev.type == "cuda":
                torch.cuda.empty_cache()

        # the method end to end (selection included), with each variant at its default knobs
        kw.WINDOW, kw.BWD_WINDOW, kw.PROGRAMS_PER_SM, kw.FWD_BLOCK_M = knob_defaults
        for setting in ("sorted", "windowed", "onepass"):
            before = (km.STATS["fwd"], kw.STATS["fwd"], op.STATS["fwd"], op.STATS["fallback"])
            with config.override(sparse_keymajor=True, sparse_keymajor_variant=setting), torch.no_grad():
                r = timed(lambda: ak.attention(q, k, v, method="moba", block_size=bs, topk=topk), T)
            ran = {"sorted": km.STATS["fwd"] - before[0], "windowed": kw.STATS["fwd"] - before[1],
                   "onepass": op.STATS["fwd"] - before[2], "onepass_fallback": op.STATS["fallback"] - before[3]}
            save(T=T, impl=f"moba-attention:{setting}", phase="fwd", executor_calls=ran, **r)
        del q, k, v, do, qp, kp, vp, dop, idx, sel, ref_out
    meta["wall_s"] = round(time.time() - t_start, 1)
    save(impl="done", phase="wall", wall_s=meta["wall_s"])


if __name__ == "__main__":
    main()
