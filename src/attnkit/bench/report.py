"""Reports of a results document: JSON, a Markdown table, a terminal summary, an HTML page with plots.

Plots (matplotlib, written as PNG files next to the HTML page, which links them):
- `time_vs_T.png`: median time versus sequence length, one line per method/backend, per workload;
- `fidelity_vs_speedup.png`: relative output error versus speedup over SDPA, per workload, with the
  Pareto front (no other point is both faster and more accurate) drawn and labelled.
"""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

Row = dict[str, Any]

COLUMNS = [
    ("workload", "workload"), ("T", "T"), ("dtype", "dtype"), ("method", "method"), ("backend", "backend"),
    ("options", "options"), ("time_ms", "time ms"), ("select_ms", "select ms"), ("speedup", "vs SDPA"),
    ("tflops", "TFLOP/s"),
    ("peak_memory_bytes", "peak MiB"), ("rel_error", "rel. error"), ("cosine", "cosine"),
    ("lse_error", "LSE err"), ("recall", "recall"), ("density", "density"), ("needle_hits", "needles"),
    ("status", "status"),
]
TERMINAL = ["workload", "T", "dtype", "method", "backend", "time_ms", "select_ms", "speedup", "peak_memory_bytes",
            "rel_error", "recall", "density", "status"]


def _options(opts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items()) or "-"


def cell(row: Row, key: str) -> str:
    """One formatted value; '-' for not available."""
    val = row.get(key)
    if key == "status":
        return "ok" if val == "ok" else f"{val}: {row.get('error') or ''}".strip()
    if key == "options":
        return _options(val or {})
    if val is None:
        return "-"
    if key == "peak_memory_bytes":
        return f"{val / 2**20:.1f}"
    if key in ("time_ms", "select_ms"):
        return f"{val:.3g}" if val < 1000 else f"{val:.0f}"
    if key == "speedup":
        return f"{val:.2f}x"
    if key == "tflops":
        return f"{val:.3g}"
    if key in ("rel_error", "lse_error"):
        return f"{val:.1e}"
    if key in ("recall", "density", "needle_hits", "cosine"):
        return f"{val:.4f}" if key == "cosine" else f"{val:.3f}"
    return str(val)


def _label(row: Row) -> str:
    name = row["method"]
    return name if row["kind"] == "baseline" or not row.get("backend") else f"{name}[{row['backend']}]"


def write_json(doc: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def _header_lines(doc: dict[str, Any]) -> list[str]:
    dev, ver, git = doc["device"], doc["versions"], doc["git"]
    where = f"{dev['name']} ({dev['type']}" + (f", {dev['threads']} threads)" if dev["type"] == "cpu" else ")")
    vers = ", ".join(f"{k} {v}" for k, v in ver.items() if v)
    commit = (git["commit"] or "unknown")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
    cfg = doc["config"]
    shape = cfg["shape"]
    return [
        f"- command: `{doc['command']}`",
        f"- device: {where}",
        f"- versions: {vers}",
        f"- commit: {commit}; created {doc['created']}",
        f"- synthetic shape: B={shape['batch']}, Hq={shape['heads_q']}, Hkv={shape['heads_kv']}, D={shape['head_dim']}; "
        f"causal={cfg['causal']}; forward only; median of up to {cfg['repeats']} warm runs after {cfg['warmup']} warm-up",
    ]


def markdown(doc: dict[str, Any]) -> str:
    """The results as a Markdown document: header, workloads, one table of every row, notes."""
    lines = ["# attnkit bench results", "", *_header_lines(doc), "", "## Workloads", ""]
    for w in doc["workloads"]:
        lines.append(f"- `{w['name']}` ({w['status']}): {w['description']}")
    lines += ["", "## Results", "", "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in doc["rows"]:
        lines.append("| " + " | ".join(cell(r, k).replace("|", "\\|") for k, _ in COLUMNS) + " |")
    notes = [(r, n) for r in doc["rows"] for n in r["notes"] + ([r["fidelity_note"]] if r["fidelity_note"] else [])]
    if notes:
        lines += ["", "## Notes", ""]
        seen = set()
        for r, n in notes:
            key = (r["method"], n)
            if key not in seen:
                seen.add(key)
                lines.append(f"- `{r['method']}`: {n}")
    lines += ["", "Metrics are defined in docs/benchmark.md. '-' means not available for that row.", ""]
    return "\n".join(lines)


def terminal_table(doc: dict[str, Any]) -> str:
    """An aligned plain-text summary of every row."""
    heads = dict(COLUMNS)
    table = [[heads[k] for k in TERMINAL]]
    for r in doc["rows"]:
        vals = [cell(r, k) for k in TERMINAL]
        if len(vals[-1]) > 60:
            vals[-1] = vals[-1][:57] + "..."
        table.append(vals)
    widths = [max(len(row[i]) for row in table) for i in range(len(TERMINAL))]
    out = []
    for n, row in enumerate(table):
        out.append("  ".join(v.ljust(w) if i in (0, 2, 3, 4, len(row) - 1) else v.rjust(w)
                             for i, (v, w) in enumerate(zip(row, widths))).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    skipped = [w for w in doc["workloads"] if w["status"] == "skipped"]
    for w in skipped:
        out.append(f"workload {w['name']!r} skipped: {w['description']}")
    return "\n".join(out)


# --- plots ------------------------------------------------------------------------------------


def _panels(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    by: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for r in rows:
        by[(r["workload"], r["dtype"])].append(r)
    return dict(by)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (speedup, error) that no other point beats on both (higher speedup, lower error)."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, n)
    return math.ceil(n / cols), cols


def plot_time_vs_T(doc: dict[str, Any], path: Path) -> bool:
    """Median time versus T per method, one panel per (workload, dtype) with at least two lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in doc["rows"] if r["status"] == "ok" and r["time_ms"]]
    panels = {k: v for k, v in _panels(ok).items() if len({r["T"] for r in v}) >= 2}
    if not panels:
        panels = _panels(ok)
    if not panels:
        return False
    nr, nc = _grid(len(panels))
    fig, axes = plt.subplots(nr, nc, figsize=(6.5 * nc, 4.5 * nr), squeeze=False)
    for ax, ((wl, dt), rows) in zip(axes.flat, sorted(panels.items())):
        lines: dict[str, list[Row]] = defaultdict(list)
        for r in rows:
            lines[_label(r)].append(r)
        cmap = plt.get_cmap("tab20")
        for n, (label, rs) in enumerate(sorted(lines.items())):
            rs = sorted(rs, key=lambda r: r["T"])
            style = "--" if rs[0]["kind"] == "baseline" else ("-" if n < 20 else ":")
            ax.plot([r["T"] for r in rs], [r["time_ms"] for r in rs], style, marker="o", ms=3, label=label,
                    color=cmap(n % 20))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{wl}, {dt}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"time vs T ({doc['device']['name']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_fidelity_vs_speedup(doc: dict[str, Any], path: Path) -> bool:
    """Relative error versus speedup over SDPA, with the Pareto front, one panel per (workload, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in doc["rows"] if r["status"] == "ok" and r["speedup"] and r["rel_error"] is not None]
    panels = _panels(ok)
    if not panels:
        return False
    floor = 1e-9  # errors below this (exact paths) are drawn at the floor
    nr, nc = _grid(len(panels))
    fig, axes = plt.subplots(nr, nc, figsize=(6.5 * nc, 4.8 * nr), squeeze=False)
    for ax, ((wl, dt), rows) in zip(axes.flat, sorted(panels.items())):
        pts = [(r["speedup"], max(r["rel_error"], floor)) for r in rows]
        labels = sorted({_label(r) for r in rows})
        cmap = plt.get_cmap("tab20")
        for n, label in enumerate(labels):
            sel = [(p, r) for p, r in zip(pts, rows) if _label(r) == label]
            ax.scatter([p[0] for p, _ in sel], [p[1] for p, _ in sel], s=[12 + 4 * math.log2(max(r["T"], 2)) for _, r in sel],
                       color=cmap(n % 20), label=label, alpha=0.8)
        front = sorted(pareto_front(pts), key=lambda i: pts[i][0])
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k-", lw=1, alpha=0.6, label="Pareto front")
        for i in front:
            ax.annotate(f"{_label(rows[i])} T={rows[i]['T']}", pts[i], fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("speedup over SDPA (same run)")
        ax.set_ylabel(f"relative L2 error (floor {floor:g})")
        ax.set_title(f"{wl}, {dt}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("fidelity vs speedup (lower right is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- HTML ------------------------------------------------------------------------------------


def _html_table(doc: dict[str, Any]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in COLUMNS)
    body = []
    for r in doc["rows"]:
        cls = "" if r["status"] == "ok" else f' class="{r["status"]}"'
        tds = "".join(f"<td>{html.escape(cell(r, k))}</td>" for k, _ in COLUMNS)
        body.append(f"<tr{cls}>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def html_page(doc: dict[str, Any], plots: list[str], plot_note: Optional[str]) -> str:
    md_head = _header_lines(doc)
    meta = "".join(f"<li>{html.escape(line[2:].replace('`', ''))}</li>" for line in md_head)
    wls = "".join(f"<li><b>{html.escape(w['name'])}</b> ({w['status']}): {html.escape(w['description'])}</li>"
                  for w in doc["workloads"])
    imgs = "".join(f'<p><img src="{html.escape(p)}" alt="{html.escape(p)}"></p>' for p in plots)
    if plot_note:
        imgs += f"<p><i>{html.escape(plot_note)}</i></p>"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>attnkit bench</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 12px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
td:nth-child(1), td:nth-child(4), td:nth-child(5), td:nth-child(6), td:last-child {{ text-align: left; }}
tr.error {{ background: #fdd; }} tr.skipped {{ background: #eee; color: #666; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>attnkit bench</h1>
<ul>{meta}</ul>
<h2>Workloads</h2><ul>{wls}</ul>
<h2>Plots</h2>{imgs}
<h2>Results</h2>{_html_table(doc)}
<p>Metrics are defined in docs/benchmark.md; '-' means not available for that row.</p>
</body></html>
"""


def write_reports(doc: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write bench.json, bench.md, the plots and report.html into `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md", "html": out_dir / "report.html"}
    write_json(doc, paths["json"])
    paths["markdown"].write_text(markdown(doc))
    plots, note = [], None
    try:
        for name, fn in (("time_vs_T.png", plot_time_vs_T), ("fidelity_vs_speedup.png", plot_fidelity_vs_speedup)):
            if fn(doc, out_dir / name):
                plots.append(name)
                paths[name] = out_dir / name
    except ImportError:
        note = "plots need matplotlib: pip install 'attnkit[bench]'"
    if not note and len(plots) < 2:
        note = "some plots were not drawn: no successful rows with the values they need"
    paths["html"].write_text(html_page(doc, plots, note))
    return paths
