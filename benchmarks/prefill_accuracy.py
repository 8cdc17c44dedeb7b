"""Attention-level fidelity of the training-free prefill methods against dense causal attention (CPU).

Workloads from `attnkit.bench.workloads`: `concentrated` (T = 2048, Hq = 8, Hkv = 2, D = 64;
12 nats of locality: peaky, LLM-like heads), `structured` (same shape; 4 nats of locality plus
planted needles: spread attention) and `real` (q, k, v of every layer and head of MiniLM on English text,
T = 512, 6 layers as batch, 12 heads of dim 32), run causally in float32 on the reference backends.
Per method and budget:

- `density`: attended (query, key) pairs over the causal pairs (exact, causal rule applied);
- `recall`: the mean over query rows and heads of the dense attention mass the method's keys hold,
  `exp(lse_method - lse_dense)` (0 for a row that attends to nothing);
- `rel_err`: `||o - o_dense|| / ||o_dense||` over all rows (token_sparse's skipped rows are 0 by
  design; `rel_err_kept` restricts to the rows it attends).

Block sizes and budgets are scaled to these short lengths (a 128-token block at T = 512 would
leave 4 blocks); the speed benchmark runs the papers' defaults.

    PYTHONPATH=src python benchmarks/prefill_accuracy.py --out results/prefill_accuracy_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from typing import Any, Optional

import torch


def budgets(T: int) -> dict[str, list[dict[str, Any]]]:
    bs = 32
    return {
        "vertical_slash": [dict(block_size=bs, n_last=64, sinks=min(4, n), window=min(16, n), n_vertical=n, n_slash=n)
                           for n in (T // 32, T // 16, T // 8)],
        "xattention": [dict(block_size=bs, stride=8, threshold=t) for t in (0.8, 0.9, 0.95)],
        "flexprefill": [dict(block_size=bs, gamma=g, tau=0.1) for g in (0.8, 0.9, 0.95)],
        "token_sparse": [dict(coverage=c, n_last=64, sinks=4, window=64) for c in (0.8, 0.9, 0.95)],
        "hip": [dict(block_size=bs, topk=kk, sinks=1, local=1) for kk in (2, 4, 8)],
    }


def token_density(ids: torch.Tensor, T: int) -> float:
    """token_sparse: each head attends causally among its L' kept tokens."""
    kept = (ids >= 0).sum(-1).double()  # [N, Hq, 1]
    return float((kept * (kept + 1) / 2).sum() / (kept.numel() * T * (T + 1) / 2))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--structured-t", type=int, default=2048)
    ap.add_argument("--workloads", nargs="+", default=["concentrated", "structured", "real"])
    ap.add_argument("--out", default="results/prefill_accuracy_cpu.json")
    args = ap.parse_args(argv)

    import attnkit as ak
    from attnkit.bench.workloads import Shape, real_workload, structured_workload
    from attnkit.core.contract import validate_attention
    from attnkit.methods.selection_stats import density

    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        rev = "unknown"
    meta = {"device": "cpu", "torch": torch.__version__, "python": platform.python_version(), "commit": rev,
            "command": " ".join(["python"] + sys.argv), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "dtype": "float32"}
    rows: list[dict[str, Any]] = []
    dev = torch.device("cpu")
    for wl in args.workloads:
        if wl in ("structured", "concentrated"):
            w = structured_workload(args.structured_t, Shape(1, 8, 2, 64), torch.float32, dev,
                                    local_nats=12.0 if wl == "concentrated" else 4.0)
        else:
            w = real_workload(torch.float32, dev)
        q, k, v = w.q, w.k, w.v
        T = q.shape[1]
        o_d, lse_d = ak.attention(q, k, v, method="dense", backend="reference", return_lse=True)
        call = validate_attention(q, k, v, causal=True)
        for name, grid in budgets(T).items():
            spec = ak.registry.get_method(name)
            for opts in grid:
                t0 = time.time()
                out, lse = ak.attention(q, k, v, method=name, backend="reference", return_lse=True, **opts)
                sel = getattr(ak.methods, name).policy(call, spec.options.parse(name, opts))
                dens = token_density(sel.indices, T) if name == "token_sparse" else density(sel, T, T)
                rec = torch.where(torch.isinf(lse), torch.zeros_like(lse), (lse - lse_d).exp())
                kept = torch.isfinite(lse).transpose(1, 2)  # [B, T, Hq]
                err = float((out - o_d).norm() / o_d.norm())
                err_kept = float((out - o_d)[kept].norm() / o_d[kept].norm())
                row = dict(workload=wl, T=T, method=name, options=opts, density=round(dens, 4),
                           recall=round(float(rec.mean()), 4), rel_err=round(err, 4), rel_err_kept=round(err_kept, 4),
                           rows_attended=round(float(kept.double().mean()), 4), seconds=round(time.time() - t0, 1))
                rows.append(row)
                print(json.dumps(row), flush=True)
                with open(args.out, "w") as fh:
                    json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    md = table(rows)
    with open(args.out.rsplit(".", 1)[0] + ".md", "w") as fh:
        fh.write(md + "\n")
    print(md)
    return 0


def budget_label(name: str, o: dict[str, Any]) -> str:
    key = {"vertical_slash": "n_vertical", "xattention": "threshold", "flexprefill": "gamma", "token_sparse": "coverage",
           "hip": "topk"}[name]
    return f"{key}={o[key]}" + (f", n_slash={o['n_slash']}" if name == "vertical_slash" else "")


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| workload | method | budget | density | recall | rel. error (all rows) | rel. error (attended rows) | rows attended |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['workload']} (T={r['T']}) | `{r['method']}` | {budget_label(r['method'], r['options'])} | "
                   f"{r['density']:.3f} | {r['recall']:.3f} | {r['rel_err']:.3f} | {r['rel_err_kept']:.3f} | "
                   f"{r['rows_attended']:.3f} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
