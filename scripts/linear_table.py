"""Render `benchmarks/linear_bench.py`'s JSON as the markdown table of docs/methods/linear-family-benchmark.md.

    python scripts/linear_table.py results/linear_h100.json
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional


def _pair(row: Optional[dict[str, Any]]) -> str:
    if row is None:
        return "not measured"
    if "error" in row:
        return "failed: " + row["error"].split(":")[0]
    bwd = f"{row['fwd_bwd_ms']:.2f}" if "fwd_bwd_ms" in row else "refused"
    return f"{row['fwd_ms']:.2f} / {bwd}"


def _ratio(a: Optional[dict[str, Any]], b: Optional[dict[str, Any]], key: str) -> Optional[float]:
    if not a or not b or key not in a or key not in b:
        return None
    return a[key] / b[key]


def render(data: dict[str, Any]) -> str:
    rows = [r for r in data["results"] if r.get("kind") == "time"]
    find = lambda m, impl, T: next((r for r in rows if r["method"] == m and r["impl"] == impl and r["T"] == T), None)  # noqa: E731
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense_sdpa_cudnn"))
    Ts = sorted({r["T"] for r in rows})
    has_compile = any(r["impl"] == "chunk-compile" for r in rows)
    head = "| method | T | PyTorch chunked fwd / fwd+bwd (ms) |"
    head += " chunked + torch.compile (ms) |" if has_compile else ""
    head += " fla fwd / fwd+bwd (ms) | chunked / fla |"
    head += " compiled / fla |" if has_compile else ""
    head += " cuDNN dense causal (ms) | fla vs chunk max rel. err |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in methods:
        for T in Ts:
            ch, fl, de = find(m, "chunk", T), find(m, "fla", T), find("dense_sdpa_cudnn", "sdpa-cudnn", T)
            if ch is None and fl is None:
                continue
            rf, rb = _ratio(ch, fl, "fwd_ms"), _ratio(ch, fl, "fwd_bwd_ms")
            ratio = " / ".join(f"{x:.1f}x" for x in (rf, rb) if x is not None) or "-"
            err = fl.get("rel_max_err_vs_chunk") if fl else None
            cells = [f"`{m}`", f"{T // 1024}K", _pair(ch)]
            if has_compile:
                cc = find(m, "chunk-compile", T)
                cells.append(_pair(cc) if cc else "-")
            cells += [_pair(fl), ratio]
            if has_compile:
                cc = find(m, "chunk-compile", T)
                cr = [x for x in (_ratio(cc, fl, "fwd_ms"), _ratio(cc, fl, "fwd_bwd_ms")) if x is not None]
                cells.append(" / ".join(f"{x:.1f}x" for x in cr) or "-")
            cells += [_pair(de), f"{err:.1e}" if err is not None else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(render(json.load(f)))
