"""Reports of a results document: JSON, a Markdown report, a terminal table and summary, an HTML page.

Every report opens with the answer (`advice.summary`: what to use on this machine and why), then the
Pareto front of speed against fidelity per (device, dtype, T, workload), how to read each column,
and the full table. Plots (matplotlib, PNG files next to the HTML page):

- `time_vs_T.png`: median time versus T, one panel per family (exact attention drawn in every
  panel for reference), a distinct marker per method/backend, log axes, error bars from the
  fastest to the slowest timed run;
- `fidelity_vs_speedup.png`: relative output error versus speedup over SDPA, one panel per family,
  Pareto-front points ringed, horizontal error bars from the timing spread.
"""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from . import advice
from .advice import COLUMN_HELP, label as _label, pareto_front  # noqa: F401  (pareto_front: re-exported)

Row = dict[str, Any]

COLUMNS = [
    ("workload", "workload"), ("T", "T"), ("dtype", "dtype"), ("method", "method"), ("backend", "backend"),
    ("options", "options"), ("time_ms", "time ms"), ("spread", "min-max ms"), ("select_ms", "select ms"),
    ("speedup", "vs SDPA"), ("tflops", "TFLOP/s"),
    ("peak_memory_bytes", "peak MiB"), ("rel_error", "rel. error"), ("cosine", "cosine"),
    ("lse_error", "LSE err"), ("recall", "recall"), ("density", "density"), ("needle_hits", "needles"),
    ("status", "status"),
]
TERMINAL = ["workload", "T", "dtype", "method", "backend", "options", "time_ms", "spread", "select_ms", "speedup",
            "peak_memory_bytes", "rel_error", "recall", "density", "status"]
_LEFT = {"workload", "dtype", "method", "backend", "options", "status"}


def _options(opts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items()) or "-"


def _ms(val: float) -> str:
    return f"{val:.3g}" if val < 1000 else f"{val:.0f}"


def cell(row: Row, key: str) -> str:
    """One formatted value; '-' for not available."""
    if key == "spread":
        lo, hi = row.get("time_min_ms"), row.get("time_max_ms")
        if lo is None or hi is None:
            return "-"
        if (row.get("repeats") or 0) < 2:
            return "1 run"  # the time budget allowed one timed run: no spread to show
        return f"{_ms(lo)}-{_ms(hi)}" + ("!" if advice.is_noisy(row) else "")
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
        return _ms(val)
    if key == "speedup":
        return f"{val:.2f}x"
    if key == "tflops":
        return f"{val:.3g}"
    if key in ("rel_error", "lse_error"):
        return f"{val:.1e}"
    if key in ("recall", "density", "needle_hits", "cosine"):
        return f"{val:.4f}" if key == "cosine" else f"{val:.3f}"
    return str(val)


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
        f"causal={cfg['causal']}; {'forward + backward' if cfg.get('grad') else 'forward only'}; median, min and max "
        f"of up to {cfg['repeats']} warm runs after {cfg['warmup']} warm-up",
    ]


def _front_lines(doc: dict[str, Any]) -> list[str]:
    """Markdown table of each Pareto front (fastest first)."""
    lines = ["| device | dtype | T | workload | front (fastest first): speedup, recall, rel. error |", "|---|---|---|---|---|"]
    for (device, dtype, T, wl), rows in advice.fronts(doc["rows"]).items():
        pts = "; ".join(f"{_label(r)} {r['speedup']:.2f}x, recall {cell(r, 'recall')}, err {cell(r, 'rel_error')}"
                        + (f", {r['accuracy']['metric']} {r['accuracy']['value']:.3g}" if r.get("accuracy") else "")
                        for r in rows)
        lines.append(f"| {device} | {dtype} | {T} | {wl} | {pts} |")
    return lines


def _help_lines() -> list[str]:
    heads = dict(COLUMNS)
    return [f"- **{heads[k]}**: {COLUMN_HELP[k]}" for k, _ in COLUMNS if k in COLUMN_HELP]


def markdown(doc: dict[str, Any]) -> str:
    """The results as a Markdown document: summary, Pareto fronts, how to read, workloads, every row, notes."""
    lines = ["# attnkit bench results", "", *_header_lines(doc), "", "## Summary: what to use here", ""]
    for line in advice.summary(doc):  # paragraphs and lists apart, so Markdown renders them as such
        if lines[-1] and not (line.startswith("- ") and lines[-1].startswith("- ")):
            lines.append("")
        lines.append(line)
    lines += ["", "## Pareto front of speed against fidelity", "",
              "Rows no other row beats on both speed and relative error, per device, dtype, length and workload.", ""]
    lines += _front_lines(doc)
    lines += ["", "## How to read the columns", "", *_help_lines(), "", "## Workloads", ""]
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
    """An aligned plain-text table of every row."""
    heads = dict(COLUMNS)
    table = [[heads[k] for k in TERMINAL]]
    for r in doc["rows"]:
        vals = [cell(r, k) for k in TERMINAL]
        if len(vals[-1]) > 60:
            vals[-1] = vals[-1][:57] + "..."
        if len(vals[5]) > 40:
            vals[5] = vals[5][:37] + "..."
        table.append(vals)
    widths = [max(len(row[i]) for row in table) for i in range(len(TERMINAL))]
    out = []
    for n, row in enumerate(table):
        out.append("  ".join(v.ljust(w) if TERMINAL[i] in _LEFT else v.rjust(w)
                             for i, (v, w) in enumerate(zip(row, widths))).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    skipped = [w for w in doc["workloads"] if w["status"] == "skipped"]
    for w in skipped:
        out.append(f"workload {w['name']!r} skipped: {w['description']}")
    return "\n".join(out)


# --- plots ------------------------------------------------------------------------------------

MARKERS = "osD^v<>ph*XP8d"


def _styles(labels: list[str]) -> dict[str, tuple[Any, str]]:
    """A (colour, marker) per label, distinct within a panel (10 colours x 14 markers)."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    return {lab: (cmap(i % 10), MARKERS[i % len(MARKERS)]) for i, lab in enumerate(labels)}


def _family_panels(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows by family; the SDPA baseline also appears in every other panel, for reference."""
    fams = sorted({r["family"] for r in rows if r["family"] != "exact"})
    exact = [r for r in rows if r["family"] == "exact"]
    reference = [r for r in exact if r["method"] == "sdpa"] or [r for r in exact if r["method"] == "dense"]
    panels = {"exact": exact} if exact else {}
    for f in fams:
        panels[f] = [r for r in rows if r["family"] == f] + reference
    return panels


def _preferred_workload(rows: list[Row]) -> Optional[str]:
    """The workload the plots show: the synthetic one with the most lengths (structured wins ties)."""
    lengths: dict[str, set[int]] = defaultdict(set)
    for r in rows:
        lengths[r["workload"]].add(r["T"])
    if not lengths:
        return None
    return max(lengths, key=lambda w: (len(lengths[w]), w == "structured", w == "random"))


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, n)
    return math.ceil(n / cols), cols


def _subplots(n: int, title: str) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nr, nc = _grid(n)
    fig, axes = plt.subplots(nr, nc, figsize=(6.0 * nc, 4.6 * nr), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    return fig, list(axes.flat)[:n]


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_time_vs_T(doc: dict[str, Any], path: Path) -> bool:
    """Median time versus T, one panel per family, error bars from the fastest to the slowest run."""
    ok = [r for r in doc["rows"] if r["status"] == "ok" and r["time_ms"]]
    wl = _preferred_workload(ok)
    ok = [r for r in ok if r["workload"] == wl]
    dtypes = sorted({r["dtype"] for r in ok})
    ok = [r for r in ok if r["dtype"] == dtypes[0]] if dtypes else ok
    panels = _family_panels(ok)
    if not panels:
        return False
    fig, axes = _subplots(len(panels), f"median time vs T, {wl} workload, {dtypes[0]}, {doc['device']['name']} "
                                       "(bars: fastest to slowest run)")
    for ax, (fam, rows) in zip(axes, panels.items()):
        lines: dict[str, list[Row]] = defaultdict(list)
        for r in rows:
            lines[_label(r)].append(r)
        styles = _styles(sorted(lines))
        for lab, rs in sorted(lines.items()):
            rs = sorted(rs, key=lambda r: r["T"])
            ys = [r["time_ms"] for r in rs]
            lo = [y - (r.get("time_min_ms") or y) for y, r in zip(ys, rs)]
            hi = [(r.get("time_max_ms") or y) - y for y, r in zip(ys, rs)]
            colour, marker = styles[lab]
            ref = rs[0]["family"] == "exact" and fam != "exact"
            ax.errorbar([r["T"] for r in rs], ys, yerr=[lo, hi], fmt=marker, ls=":" if ref else "-", ms=5, capsize=3,
                        color="0.5" if ref else colour, label=lab, alpha=0.6 if ref else 0.9)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{fam}" + (" (SDPA dotted grey)" if fam != "exact" else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
    return True


def plot_fidelity_vs_speedup(doc: dict[str, Any], path: Path) -> bool:
    """Relative error versus speedup over SDPA, one panel per family, Pareto-front points ringed."""
    ok = [r for r in doc["rows"] if r["status"] == "ok" and r["speedup"] and r["rel_error"] is not None]
    wl = _preferred_workload(ok)
    ok = [r for r in ok if r["workload"] == wl]
    if not ok:
        return False
    floor = 1e-9  # errors below this (exact paths) are drawn at the floor
    on_front = {id(r) for rs in advice.fronts(ok).values() for r in rs}
    panels = _family_panels(ok)
    fig, axes = _subplots(len(panels), f"fidelity vs speedup, {wl} workload (lower right is better; SDPA grey; "
                                       "ringed: Pareto front at that T; marker size grows with T)")
    for ax, (fam, rows) in zip(axes, panels.items()):
        labels = sorted({_label(r) for r in rows})
        styles = _styles(labels)
        for lab in labels:
            sel = [r for r in rows if _label(r) == lab]
            xs = [r["speedup"] for r in sel]
            ys = [max(r["rel_error"], floor) for r in sel]
            # speedup range from this row's spread: SDPA median / slowest .. / fastest run
            xlo = [x - x * r["time_ms"] / (r.get("time_max_ms") or r["time_ms"]) for x, r in zip(xs, sel)]
            xhi = [x * r["time_ms"] / (r.get("time_min_ms") or r["time_ms"]) - x for x, r in zip(xs, sel)]
            colour, marker = styles[lab]
            if sel[0]["family"] == "exact" and fam != "exact":
                colour = "0.5"
            ax.errorbar(xs, ys, xerr=[xlo, xhi], fmt="none", ecolor=colour, alpha=0.5, capsize=2)
            ax.scatter(xs, ys, s=[14 + 5 * math.log2(max(r["T"], 2)) for r in sel], color=colour, marker=marker,
                       label=lab, alpha=0.85)
            front = [(x, y) for x, y, r in zip(xs, ys, sel) if id(r) in on_front]
            if front:
                ax.scatter(*zip(*front), s=160, facecolors="none", edgecolors="k", linewidths=1)
        ax.axvline(1.0, color="0.6", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("speedup over SDPA (same run; > 1 is faster)")
        ax.set_ylabel(f"relative L2 error (floor {floor:g})")
        ax.set_title(fam)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
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


def _html_summary(doc: dict[str, Any]) -> str:
    """The summary as HTML: the first line of each setting as a paragraph, per-length lines as a list."""
    out, items = [], []
    for line in advice.summary(doc):
        if line.startswith("- "):
            items.append(f"<li>{html.escape(line[2:])}</li>")
            continue
        if items:
            out.append(f"<ul>{''.join(items)}</ul>")
            items = []
        cls = ' class="warning"' if line.startswith("Warning") else ""
        out.append(f"<p{cls}>{html.escape(line)}</p>")
    if items:
        out.append(f"<ul>{''.join(items)}</ul>")
    return "".join(out)


def _html_fronts(doc: dict[str, Any]) -> str:
    head = "<tr><th>device</th><th>dtype</th><th>T</th><th>workload</th><th>front (fastest first)</th></tr>"
    body = []
    for (device, dtype, T, wl), rows in advice.fronts(doc["rows"]).items():
        pts = "<br>".join(html.escape(f"{_label(r)}: {r['speedup']:.2f}x, recall {cell(r, 'recall')}, "
                                      f"rel. error {cell(r, 'rel_error')}") for r in rows)
        body.append(f"<tr><td>{device}</td><td>{dtype}</td><td>{T}</td><td>{wl}</td><td>{pts}</td></tr>")
    return f"<table class=\"front\"><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def html_page(doc: dict[str, Any], plots: list[str], plot_note: Optional[str]) -> str:
    md_head = _header_lines(doc)
    meta = "".join(f"<li>{html.escape(line[2:].replace('`', ''))}</li>" for line in md_head)
    wls = "".join(f"<li><b>{html.escape(w['name'])}</b> ({w['status']}): {html.escape(w['description'])}</li>"
                  for w in doc["workloads"])
    imgs = "".join(f'<p><img src="{html.escape(p)}" alt="{html.escape(p)}"></p>' for p in plots)
    if plot_note:
        imgs += f"<p><i>{html.escape(plot_note)}</i></p>"
    heads = dict(COLUMNS)
    helps = "".join(f"<dt>{html.escape(heads[k])}</dt><dd>{html.escape(COLUMN_HELP[k])}</dd>"
                    for k, _ in COLUMNS if k in COLUMN_HELP)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>attnkit bench</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 110em; }}
table {{ border-collapse: collapse; font-size: 12px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
td:nth-child(1), td:nth-child(4), td:nth-child(5), td:nth-child(6), td:last-child {{ text-align: left; }}
table.front td {{ text-align: left; }}
tr.error {{ background: #fdd; }} tr.skipped {{ background: #eee; color: #666; }}
#summary {{ border-left: 4px solid #2a6; padding: 0.2em 1em; background: #f4fbf6; }}
#summary p:first-child {{ font-size: 1.15em; font-weight: bold; }}
p.warning {{ color: #a50; }}
dt {{ font-weight: bold; float: left; clear: left; width: 8em; }} dd {{ margin-left: 9em; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>attnkit bench</h1>
<section id="summary"><h2>What to use here</h2>{_html_summary(doc)}</section>
<ul>{meta}</ul>
<h2>Pareto front of speed against fidelity</h2>
<p>Per device, dtype, length and workload: the rows that no other row beats on both speed and relative error.</p>
{_html_fronts(doc)}
<h2>Plots</h2>{imgs}
<h2>How to read the columns</h2><dl>{helps}</dl>
<h2>Workloads</h2><ul>{wls}</ul>
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
