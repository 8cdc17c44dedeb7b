"""The accuracy report: a Markdown page (dense per task and length; every configuration's accuracy
relative to dense next to its prefill and decode time and KV memory; a written summary) and a plot
of accuracy against compression and against prefill speed-up, both from the results document."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

HOLDS = 0.9  # relative accuracy at or above which a configuration "holds up"
FAILS = 0.5  # below which it "fails"


def _f(x: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in doc["rows"] if r.get("accuracy") is not None]


def pooled(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per configuration, over every length it reached: relative accuracy (its correct answers /
    dense's correct answers on the same lengths), mean fraction, mean prefill speed-up, samples."""
    rows = _rows(doc)
    dense = {r["T"]: r["accuracy"] for r in rows if r["kind"] == "baseline"}
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        a = r["accuracy"]
        if not a["samples"]:
            continue
        d = dense.get(r["T"])
        p = out.setdefault(a["config"], {"method": r["method"], "family": r["family"], "budget": a["budget"],
                                         "correct": 0.0, "dense_correct": 0.0, "samples": 0, "fractions": [],
                                         "speedups": [], "worst": None, "lengths": []})
        p["correct"] += a["score"] * a["samples"]
        if d and d["samples"]:
            p["dense_correct"] += d["score"] * a["samples"]
        p["samples"] += a["samples"]
        p["lengths"].append(r["T"])
        if a["fraction"] is not None:
            p["fractions"].append(a["fraction"])
        if r["speedup"] is not None:
            p["speedups"].append(r["speedup"])
        rel = a["relative_to_dense"]
        if rel is not None and (p["worst"] is None or rel < p["worst"][0]):
            p["worst"] = (rel, r["T"])
    for p in out.values():
        p["relative"] = p["correct"] / p["dense_correct"] if p["dense_correct"] else None
        p["fraction"] = sum(p["fractions"]) / len(p["fractions"]) if p["fractions"] else None
        p["speedup"] = sum(p["speedups"]) / len(p["speedups"]) if p["speedups"] else None
    return out


def summary(doc: dict[str, Any]) -> list[str]:
    """Sentences on what holds up, computed from the rows (the docs add the reading)."""
    pool = pooled(doc)
    dense = [r["accuracy"] for r in _rows(doc) if r["kind"] == "baseline" and r["accuracy"]["samples"]]
    lines = []
    if dense:
        lo = min(dense, key=lambda a: a["score"])
        lines.append(f"Dense attention scores {', '.join(_f(a['score']) for a in dense)} at "
                     f"{', '.join(str(r['T']) for r in _rows(doc) if r['kind'] == 'baseline' and r['accuracy']['samples'])}"
                     f" tokens (lowest {_f(lo['score'])}).")
    groups: dict[str, list[str]] = {"holds": [], "degrades": [], "fails": []}
    for label, p in pool.items():
        if p["family"] == "exact" or p["relative"] is None:
            continue
        g = "holds" if p["relative"] >= HOLDS else "degrades" if p["relative"] >= FAILS else "fails"
        groups[g].append(f"`{label}` ({_f(p['relative'])}, {p['samples']} samples)")
    if groups["holds"]:
        lines.append(f"Keep at least {HOLDS:.0%} of dense accuracy over all lengths: " + ", ".join(groups["holds"]) + ".")
    if groups["degrades"]:
        lines.append(f"Keep {FAILS:.0%}-{HOLDS:.0%}: " + ", ".join(groups["degrades"]) + ".")
    if groups["fails"]:
        lines.append(f"Keep less than {FAILS:.0%}: " + ", ".join(groups["fails"]) + ".")
    return lines


def markdown(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    model = cfg["model"]
    dev = doc["device"]
    rows = _rows(doc)
    out = [f"# Long-context accuracy: {model['model'].split('/')[-1]}", "",
           f"- Model: `{model['model']}` ({model['model_type']}, {model['layers']} layers, {model['heads_q']} query heads, "
           f"{model['heads_kv']} KV heads, head dim {model['head_dim']}), {cfg['dtype']}",
           f"- Device: {dev['type']} ({dev['name']}); torch {doc['versions']['torch']}, transformers "
           f"{doc['versions'].get('transformers')}; commit {doc['git']['commit']}{' (dirty)' if doc['git']['dirty'] else ''}",
           f"- Command: `{doc['command']}`; created {doc['created']}",
           f"- Tasks: {', '.join(cfg['tasks'])}; lengths {', '.join(map(str, cfg['lengths']))} tokens; up to "
           f"{cfg['samples']} sample(s) per task and length, seed {cfg['seed']}",
           f"- Protocol: {cfg['protocol']}", ""]
    out += ["## Dense attention per task and length", "",
            "| T | " + " | ".join(cfg["tasks"]) + " | mean | samples |", "|---" * (len(cfg["tasks"]) + 3) + "|"]
    for r in rows:
        if r["kind"] != "baseline" or not r["accuracy"]["samples"]:
            continue
        a = r["accuracy"]
        per = [_f(a["per_task"].get(t, {}).get("score")) for t in cfg["tasks"]]
        out.append(f"| {r['T']} | " + " | ".join(per) + f" | {_f(a['score'])} | {a['samples']} |")
    out += ["", "## Every configuration", "",
            "`fraction`: what part of the context the configuration uses (prefill methods: measured density of the "
            "prompt's attention; eviction policies: KV bytes kept / dense; readers: keys read per decode query / "
            "prompt length). Times are medians over the samples; prefill covers the context and the question. "
            "KV MB: bytes of keys and values kept (reserved, with pages and metadata, in brackets).", "",
            "| T | config | fraction | accuracy | vs dense | " + " | ".join(cfg["tasks"]) +
            " | prefill ms | vs dense | decode ms/token | KV MB kept (reserved) | n | status |",
            "|---" * (len(cfg["tasks"]) + 11) + "|"]
    for r in rows:
        a = r["accuracy"]
        per = [_f(a["per_task"].get(t, {}).get("score")) for t in cfg["tasks"]]
        pre = a["prefill_ms"]["median"] if a["prefill_ms"] else None
        dec = a["decode_ms_per_token"]["median"] if a["decode_ms_per_token"] else None
        kept = a["kv_kept_bytes"] / 2**20 if a["kv_kept_bytes"] is not None else None
        res = a["kv_reserved_bytes"] / 2**20 if a["kv_reserved_bytes"] is not None else None
        status = r["status"] + (f": {r['error'][:80]}" if r["error"] else "")
        out.append(f"| {r['T']} | `{a['config']}` | {_f(a['fraction'])} | {_f(a['score'])} | "
                   f"{_f(a['relative_to_dense'])} | " + " | ".join(per) +
                   f" | {_f(pre, '{:.4g}')} | {_f(r['speedup'])}x | {_f(dec, '{:.3g}')} | {_f(kept, '{:.1f}')} "
                   f"({_f(res, '{:.1f}')}) | {a['samples']} | {status} |")
    out += ["", "## Summary (computed from the rows)", ""] + [f"- {s}" for s in summary(doc)]
    out += ["", "Not run (not applicable to a pretrained model): " +
            "; ".join(f"`{k}` ({v})" for k, v in cfg["not_applicable"].items()) + ".", ""]
    return "\n".join(out)


def plot(doc: dict[str, Any], path: Path) -> Optional[Path]:
    """Relative accuracy (pooled over lengths) against the fraction of the context used and against
    the prefill speed-up: one line per method or policy through its budgets. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pool = pooled(doc)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    by_method: dict[str, list[dict[str, Any]]] = {}
    for p in pool.values():
        if p["family"] != "exact" and p["relative"] is not None:
            by_method.setdefault(p["method"], []).append(p)
    styles = {"prefill": "o-", "kv-eviction": "s--", "kv-reader": "^:"}
    for name, ps in sorted(by_method.items()):
        ps.sort(key=lambda p: p["budget"] or 0)
        style = styles.get(ps[0]["family"], "o-")
        xs = [p["fraction"] for p in ps]
        if all(x is not None for x in xs):
            axes[0].plot(xs, [p["relative"] for p in ps], style, label=name)
        ss = [p["speedup"] for p in ps]
        if all(s is not None for s in ss):
            axes[1].plot(ss, [p["relative"] for p in ps], style, label=name)
    axes[0].set_xlabel("fraction of the context used (density / KV kept / keys read)")
    axes[1].set_xlabel("prefill speed-up over dense (same run)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("accuracy relative to dense")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.grid(alpha=0.3)
    if by_method:
        axes[0].legend(fontsize=7, ncol=2)
    dev = doc["device"]
    fig.suptitle(f"{doc['config']['model']['model'].split('/')[-1]} on {dev['name']} ({doc['config']['dtype']}), "
                 f"lengths {', '.join(map(str, doc['config']['lengths']))}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(doc: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.md").write_text(markdown(doc))
    plot(doc, out / "accuracy.png")
