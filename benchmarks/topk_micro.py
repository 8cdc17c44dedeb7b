"""How torch.topk scales with rows per call at DSA's width (T = 64K, k = 2048): decides the tile
shape of the DSA selection on a GPU. Also times the current `dsa` selection end to end.

    PYTHONPATH=src python benchmarks/topk_micro.py --out results/topk_micro.json
"""

from __future__ import annotations

import argparse
import json

import torch

from attnkit.bench.timing import time_call


def ms(fn) -> float:  # noqa: ANN001
    return time_call(fn, torch.device("cuda"), warmup=2, repeats=5, budget_s=float("inf")).median_ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--k", type=int, default=2048)
    args = ap.parse_args()
    T, k = args.T, args.k
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for R in (256, 1024, 4096, 16384):
            s = torch.randn(R, T, device="cuda", dtype=dtype)
            for sorted_ in (False,):
                t = ms(lambda: s.topk(k, dim=-1, sorted=sorted_))
                rows.append(dict(op="topk", dtype=str(dtype), R=R, cols=T, k=k, sorted=sorted_, ms=t,
                                 ms_per_1k_rows=t * 1024 / R))
                print(rows[-1], flush=True)
            del s
            torch.cuda.empty_cache()
    # the indexer scores of one row tile (Hi = 4, Di = 64), fp32 and bf16 matmuls
    Hi, Di = 4, 64
    for R in (1024, 4096):
        q = torch.randn(R * Hi, Di, device="cuda", dtype=torch.bfloat16)
        kt = torch.randn(Di, T, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(R, 1, Hi, device="cuda")
        qf, ktf = q.float(), kt.float()

        def score32() -> torch.Tensor:
            s = (qf @ ktf).relu_()
            return torch.bmm(w, s.view(R, Hi, T))

        def score16() -> torch.Tensor:
            s = (q @ kt).relu_().view(R, Hi, T)
            return torch.bmm(w.to(torch.bfloat16), s)

        def score_mixed() -> torch.Tensor:  # bf16 operands, float32 out (attnkit's bmm_f32)
            s = torch.bmm(q.view(1, R * Hi, Di), kt.view(1, Di, T), out_dtype=torch.float32).relu_()
            return torch.bmm(w, s.view(R, Hi, T))

        rows.append(dict(op="indexer_scores_fp32", R=R, cols=T, ms=ms(score32)))
        rows.append(dict(op="indexer_scores_bf16", R=R, cols=T, ms=ms(score16)))
        rows.append(dict(op="indexer_scores_bf16_in_f32_out", R=R, cols=T, ms=ms(score_mixed)))
        print(rows[-3:], flush=True)
    # the current DSA selection end to end at this T
    import attnkit.methods.dsa as dsa

    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
    qq, kk = mk(1, T, 64, 128), mk(1, T, 1, 128)
    q_idx, k_idx, w = mk(1, T, Hi, Di), mk(1, T, Di), mk(1, T, Hi).abs() * Hi ** -0.5
    sel = lambda: dsa.select(qq, kk, topk=k, q_idx=q_idx, k_idx=k_idx, w=w)  # noqa: E731
    rows.append(dict(op="dsa_select_fused_indexer", T=T, k=k, ms=ms(sel)))
    print(rows[-1], flush=True)
    dsa.INDEXER_KERNEL_DEVICES = ()  # PyTorch tiles (bf16 GEMM, ReLU pass, GEMV over heads)
    rows.append(dict(op="dsa_select_pytorch_tiles", T=T, k=k, ms=ms(sel)))
    print(rows[-1], flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
