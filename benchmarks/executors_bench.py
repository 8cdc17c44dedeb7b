"""Benchmark of the GPU sparse executors: attnkit's Triton kernels vs FlexAttention on the same
block selection vs cuDNN SDPA dense causal.

bf16, head dim 128, B = 1, H = 16 (MHA, per-head selection), causal, block 128 x 128. For each
density d, every query block selects round(d * T / 128) key blocks among its causal ones (its own
diagonal block always in), at random. Effective TFLOP/s count only the visited (query, key) pairs:
forward 4 * pairs * D; forward+backward 3.5x that (the FlashAttention convention). Times are
medians of CUDA-event timings (`triton.testing.do_bench`), warm.

The Triton time is `attnkit.kernels.sparse.sparse_attention` (the executor without the selection
checks of `ops.sparse_attention`) and includes everything it does (the backward builds its
reverse index); the flex time excludes building the BlockMask (done once per selection, outside
the timed region), as a model would reuse it across layers.

    PYTHONPATH=src python benchmarks/executors_bench.py --seqlens 32768 131072 --out results/executors_h100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F


def block_selection(T: int, H: int, block: int, density: float, device, seed: int = 0):
    from attnkit.core.selection import KVSelection

    nb = -(-T // block)
    width = max(1, round(density * nb))
    g = torch.Generator(device=device).manual_seed(seed)
    n = torch.arange(nb, device=device).view(1, nb, 1)
    m = torch.arange(nb, device=device).view(1, 1, nb)
    scores = torch.rand(H, nb, nb, generator=g, device=device)
    scores = torch.where(m < n, scores, torch.full_like(scores, -1.0))  # causal candidates
    scores = torch.where(m == n, torch.full_like(scores, 2.0), scores)  # own block always selected
    top = scores.topk(width, dim=-1)
    idx = torch.where(top.values >= 0, top.indices, torch.full_like(top.indices, -1))
    return KVSelection(idx.unsqueeze(0).to(torch.int32).contiguous(), block, block)


def visited_pairs(sel, T: int) -> int:
    """(query, key) pairs the causal block selection visits (diagonal blocks counted triangular)."""
    idx = sel.indices.long()
    b = sel.q_block
    n = torch.arange(idx.shape[2], device=idx.device).view(1, 1, -1, 1)
    valid = idx >= 0
    full = (valid & (idx < n)).sum().item()
    diag = (valid & (idx == n)).sum().item()
    assert T % b == 0
    return int(full * b * b + diag * b * (b + 1) // 2)


def bench(fn, warmup=25, rep=100):
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def fwd_bwd(f, q, k, v, do):
    def run():
        out = f(q, k, v)
        torch.autograd.grad(out, (q, k, v), do)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[32768])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.10, 0.25])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--out", default="results/executors_h100.json")
    args = ap.parse_args()

    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attnkit as ak
    from attnkit.core.contract import validate_attention
    from attnkit.ops.executors import compiled_flex, run_flex_block_mask, selection_block_mask

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    meta = {
        "device": props.name, "sm_count": props.multi_processor_count, "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
        "dtype": "bf16", "B": 1, "H": args.heads, "D": args.head_dim, "block": args.block, "causal": True,
        "flops": "fwd = 4 * visited_pairs * D; fwd+bwd = 3.5 * fwd",
        "timing": "median of triton.testing.do_bench (CUDA events), warm",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    rows = []

    def save():
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)

    H, D = args.heads, args.head_dim
    flex = compiled_flex()
    kmod = ak.kernels.load()
    for T in args.seqlens:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16)
        # dense causal baseline: cuDNN SDPA ([B, H, T, D] layout)
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        dot = do.transpose(1, 2).contiguous()
        dense_pairs = T * (T + 1) // 2
        for backend_name, sdp in (("cudnn_sdpa_dense_causal", SDPBackend.CUDNN_ATTENTION),
                                  ("flash_sdpa_dense_causal", SDPBackend.FLASH_ATTENTION)):
            def sdpa(a, b, c, sdp=sdp):
                with sdpa_kernel(sdp):
                    return F.scaled_dot_product_attention(a, b, c, is_causal=True)
            try:
                t_f = bench(lambda: sdpa(qt, kt, vt))
                t_fb = bench(fwd_bwd(sdpa, qt, kt, vt, dot))
            except Exception as exc:  # a backend missing on this build is recorded, not fatal
                rows.append({"T": T, "executor": backend_name, "error": repr(exc)[:300]})
                continue
            fl = 4.0 * dense_pairs * D * H
            rows.append({"T": T, "executor": backend_name, "density": 1.0, "visited_pairs_per_head": dense_pairs,
                         "fwd_ms": t_f, "fwdbwd_ms": t_fb, "fwd_tflops": fl / t_f / 1e9,
                         "fwdbwd_tflops": 3.5 * fl / t_fb / 1e9})
            print(f"T={T:6d} {backend_name:26s} fwd {t_f:8.3f} ms {rows[-1]['fwd_tflops']:6.1f} TF/s | "
                  f"fwd+bwd {t_fb:8.3f} ms {rows[-1]['fwdbwd_tflops']:6.1f} TF/s", flush=True)
            save()
        for dens in args.densities:
            sel = block_selection(T, H, args.block, dens, dev)
            pairs = visited_pairs(sel, T) // H
            fl = 4.0 * pairs * D * H
            call = validate_attention(q, k, v, causal=True, return_lse=False)
            bm = selection_block_mask(sel, 1, H, H, T, T, True)

            def tri(a, b, c, sel=sel):  # the executor itself (ops.sparse_attention adds selection checks)
                return kmod.sparse_attention(a, b, c, sel.indices, sel.q_block, sel.k_block, causal=True)[0]

            def flx(a, b, c, bm=bm):
                return run_flex_block_mask(validate_attention(a, b, c, causal=True), bm, flex)

            # agreement of the two executors on this selection (bf16 outputs)
            with torch.no_grad():
                o1, o2 = tri(q, k, v), flx(q, k, v)
                rel = ((o1.float() - o2.float()).norm() / o2.float().norm()).item()
            for name, f in (("triton", tri), ("flex", flx)):
                t_f = bench(lambda: f(q, k, v))
                t_fb = bench(fwd_bwd(f, q, k, v, do))
                rows.append({"T": T, "executor": name, "density": dens,
                             "width": sel.width, "visited_pairs_per_head": pairs,
                             "visited_fraction_of_causal": pairs / dense_pairs, "fwd_ms": t_f, "fwdbwd_ms": t_fb,
                             "fwd_tflops": fl / t_f / 1e9, "fwdbwd_tflops": 3.5 * fl / t_fb / 1e9,
                             "rel_diff_triton_vs_flex": rel})
                print(f"T={T:6d} d={dens:4.2f} {name:8s} fwd {t_f:8.3f} ms {rows[-1]['fwd_tflops']:6.1f} TF/s | "
                      f"fwd+bwd {t_fb:8.3f} ms {rows[-1]['fwdbwd_tflops']:6.1f} TF/s  (rel diff {rel:.1e})",
                      flush=True)
                save()
            del call
        del q, k, v, qt, kt, vt
        torch.cuda.empty_cache()
    meta["triton_tile_configs"] = {repr(k_): list(v_) for k_, v_ in kmod.tuned_configs().items()}
    # summary ratios
    print("\nratio triton / flex (effective TFLOP/s): T, density, fwd, fwd+bwd")
    for T in args.seqlens:
        for dens in args.densities:
            r = {x["executor"]: x for x in rows if x.get("T") == T and x.get("density") == dens}
            if "triton" in r and "flex" in r:
                print(f"  {T:6d} {dens:4.2f} {r['triton']['fwd_tflops'] / r['flex']['fwd_tflops']:5.2f} "
                      f"{r['triton']['fwdbwd_tflops'] / r['flex']['fwdbwd_tflops']:5.2f}")
    save()


if __name__ == "__main__":
    main()
