"""Which method to use here: the Pareto front of speed against fidelity, and a written recommendation.

A results file holds many rows; a reader wants one answer per device, dtype and length. The rules:

- **Exact** attention is the fastest row of the `exact` family at that (device, dtype, T) and
  workload: an SDPA baseline or the `dense` method on whichever backend was fastest.
- An **approximate** method (any family except `exact` and `linear`) is *acceptable* when, on every
  workload that judges fidelity, it keeps at least `RECALL_MIN` of the exact attention mass and its
  output is within `REL_ERROR_MAX` relative L2 error (and, where a real-model accuracy was measured
  with a baseline, loses at most `ACCURACY_DROP_MAX` of it). The judging workloads are the
  structured and real ones where they were measured (they have the structure sparse methods rely
  on); the random workload (flat attention, the worst case) judges only when it is alone.
- It is *recommended* when it is also faster than exact attention on every workload, by more than
  the timing noise: its slowest run beats exact attention's fastest run where both spreads are
  known. Among several, the fastest (geometric mean of the speedups) wins.
- The **linear** family computes a different model (it needs training or conversion), so it is
  never recommended as a drop-in replacement; its fastest row is named for reference.

A row's timing is **noisy** when its slowest timed run took more than `NOISY_SPREAD` times its
fastest: on a busy machine medians can move by several times between runs, and the summary says so.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

Row = dict[str, Any]

RECALL_MIN = 0.9
REL_ERROR_MAX = 0.05
ACCURACY_DROP_MAX = 0.01
NOISY_SPREAD = 1.5
JUDGING_WORKLOADS = ("structured", "real")


def label(row: Row) -> str:
    """`method[backend]` for a method row, the baseline's name for a baseline."""
    name = row["method"]
    return name if row["kind"] == "baseline" or not row.get("backend") else f"{name}[{row['backend']}]"


def spread(row: Row) -> Optional[float]:
    """Slowest over fastest timed run (None with fewer than two runs or no spread recorded)."""
    lo, hi = row.get("time_min_ms"), row.get("time_max_ms")
    if not lo or not hi or (row.get("repeats") or 0) < 2:
        return None
    return hi / lo


def is_noisy(row: Row) -> bool:
    s = spread(row)
    return s is not None and s > NOISY_SPREAD


def fidelity_problem(row: Row) -> Optional[str]:
    """Why a row's fidelity is not acceptable (None when it is)."""
    if row.get("recall") is None and row.get("rel_error") is None:
        return "fidelity not measured"
    if row.get("recall") is not None and row["recall"] < RECALL_MIN:
        return f"recall {row['recall']:.2f} < {RECALL_MIN:g}"
    if row.get("rel_error") is not None and row["rel_error"] > REL_ERROR_MAX:
        return f"relative error {row['rel_error']:.2g} > {REL_ERROR_MAX:g}"
    acc = row.get("accuracy") or {}
    if acc.get("baseline") is not None and acc["value"] < acc["baseline"] - ACCURACY_DROP_MAX:
        return f"{acc['metric']} {acc['value']:.3g} vs {acc['baseline']:.3g} exact"
    return None


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (speedup, error) that no other point beats on both (higher speedup, lower error)."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _key(row: Row) -> tuple[str, str, int, str]:
    return row["device"], row["dtype"], row["T"], row.get("pass") or "forward"


def _variant(row: Row) -> tuple[str, str, str]:
    """A method row's identity across workloads: method, backend, options."""
    return row["method"], row.get("backend") or "", repr(sorted((row.get("options") or {}).items()))


def _gmean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


@dataclass
class Candidate:
    label: str
    speedup: float  # geometric mean over workloads of exact time / this time
    recall: Optional[float]  # the lowest over the judging workloads
    rel_error: Optional[float]  # the highest over the judging workloads
    problem: Optional[str]  # why it is not recommended (None: recommended)


@dataclass
class Decision:
    """What to use at one (device, dtype, T), and why."""

    device: str
    dtype: str
    T: int
    pass_: str  # "forward" or "forward+backward"
    exact: str  # the fastest exact row's label
    exact_ms: float
    workloads: list[str]
    use: Optional[Candidate] = None  # None: use exact attention
    closest: Optional[Candidate] = None  # the fastest acceptable-but-slower, or most faithful rejected one
    linear: Optional[Candidate] = None
    noisy_rows: int = 0
    rows: int = 0
    rejected: list[Candidate] = field(default_factory=list)

    @property
    def choice(self) -> str:
        return self.use.label if self.use else self.exact

    def sentence(self) -> str:
        where = f"T={self.T} {self.dtype} on {self.device}" + ("" if self.pass_ == "forward" else f", {self.pass_}")
        if self.use:
            c = self.use
            return (f"{where}: use {c.label}, {c.speedup:.2f}x faster than exact attention ({self.exact}) at "
                    f"recall {_fmt(c.recall)}, relative error {_fmt(c.rel_error, '.1e')}.")
        why = "no approximate method is both faster and faithful"
        if self.closest is not None:
            c = self.closest
            why += (f" (closest: {c.label} {c.speedup:.2f}x, recall {_fmt(c.recall)}, "
                    f"rel. error {_fmt(c.rel_error, '.1e')}: {c.problem})")
        return f"{where}: use exact attention (method='dense'; fastest exact kernel: {self.exact}, {self.exact_ms:.3g} ms); {why}."


def _fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def decide(rows: list[Row]) -> list[Decision]:
    """One decision per (device, dtype, T) that has an exact row, shortest T first."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("time_ms")]
    by_key: dict[tuple, list[Row]] = defaultdict(list)
    for r in ok:
        by_key[_key(r)].append(r)
    out = []
    for key in sorted(by_key):
        group = by_key[key]
        exact_by_wl: dict[str, Row] = {}
        for r in group:
            if r["family"] == "exact" and (r["workload"] not in exact_by_wl
                                           or r["time_ms"] < exact_by_wl[r["workload"]]["time_ms"]):
                exact_by_wl[r["workload"]] = r
        if not exact_by_wl:
            continue
        workloads = sorted(exact_by_wl)
        judging = [w for w in workloads if w in JUDGING_WORKLOADS] or workloads
        # the exact label readers should use: the fastest exact row on the judging workloads
        exact_row = min((exact_by_wl[w] for w in judging), key=lambda r: r["time_ms"])
        d = Decision(*key, exact=label(exact_row), exact_ms=exact_row["time_ms"], workloads=workloads,
                     rows=len(group), noisy_rows=sum(is_noisy(r) for r in group))
        variants: dict[tuple, list[Row]] = defaultdict(list)
        for r in group:
            if r["kind"] == "method" and r["family"] != "exact" and r["workload"] in exact_by_wl:
                variants[_variant(r)].append(r)
        accepted, rejected, linear = [], [], []
        for rs in variants.values():
            speedups = [exact_by_wl[r["workload"]]["time_ms"] / r["time_ms"] for r in rs]
            sp = _gmean(speedups)
            judged = [r for r in rs if r["workload"] in judging]
            if rs[0]["family"] == "linear":
                linear.append(Candidate(label(rs[0]), sp, None, None, "a different model (linear family)"))
                continue
            if not judged:
                continue
            recalls = [r["recall"] for r in judged if r.get("recall") is not None]
            errors = [r["rel_error"] for r in judged if r.get("rel_error") is not None]
            problem = next((f"{p} on {r['workload']}" for r in judged if (p := fidelity_problem(r))), None)
            if problem is None:
                slower = [r for r in rs if r["time_ms"] >= exact_by_wl[r["workload"]]["time_ms"]]
                within_noise = [r for r in rs if r.get("time_max_ms") and exact_by_wl[r["workload"]].get("time_min_ms")
                                and r["time_max_ms"] >= exact_by_wl[r["workload"]]["time_min_ms"]]
                if slower:
                    problem = f"slower than exact on {slower[0]['workload']}"
                elif within_noise:
                    problem = f"faster by less than the timing spread on {within_noise[0]['workload']}"
            c = Candidate(label(rs[0]), sp, min(recalls) if recalls else None, max(errors) if errors else None, problem)
            (rejected if problem else accepted).append(c)
        if accepted:
            d.use = max(accepted, key=lambda c: c.speedup)
        faithful_slow = [c for c in rejected if c.problem and (c.problem.startswith("slower")
                                                               or c.problem.startswith("faster by less"))]
        if faithful_slow:
            d.closest = max(faithful_slow, key=lambda c: c.speedup)
        elif rejected:
            d.closest = max(rejected, key=lambda c: ((c.recall or 0.0), c.speedup))
        d.rejected = sorted(rejected, key=lambda c: -c.speedup)
        d.linear = max(linear, key=lambda c: c.speedup) if linear else None
        out.append(d)
    return out


def fronts(rows: list[Row]) -> dict[tuple[str, str, int, str], list[Row]]:
    """Per (device, dtype, T, workload): the rows on the Pareto front of speedup against relative error,
    fastest first (rows without a speedup or an error, such as the linear family, are left out)."""
    by: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and r.get("speedup") and r.get("rel_error") is not None:
            by[(*_key(r), r["workload"])].append(r)
    out = {}
    for key in sorted(by):
        rs = by[key]
        key = key[:3] + key[4:] if key[3] == "forward" else (key[0], f"{key[1]} {key[3]}", *key[2:3], key[4])
        idx = pareto_front([(r["speedup"], r["rel_error"]) for r in rs])
        out[key] = [rs[i] for i in idx]
    return out


def summary(doc: dict[str, Any]) -> list[str]:
    """The written answer: what to use on this machine and why, per length, and how far to trust the timings."""
    rows = doc["rows"]
    decisions = decide(rows)
    dev = doc.get("device", {})
    machine = dev.get("name", "this machine")
    if not decisions:
        return [f"No recommendation: no exact-attention row finished on {machine}, so nothing can be compared."]
    lines = []
    by_setting: dict[tuple[str, str, str], list[Decision]] = defaultdict(list)
    for d in decisions:
        by_setting[(d.device, d.dtype, d.pass_)].append(d)
    for (device, dtype, pass_), ds in by_setting.items():
        dtype = dtype if pass_ == "forward" else f"{dtype}, {pass_}"
        longest = ds[-1]
        Ts = f"T = {ds[0].T}" if len(ds) == 1 else f"T = {ds[0].T} to {longest.T}"
        uses = sorted({d.use.label for d in ds if d.use})
        if not uses:
            lines.append(f"On {machine} ({device}, {dtype}, {Ts}): use exact attention, method='dense' "
                         f"(fastest exact kernel here: {longest.exact}). "
                         f"No approximate method was faster than exact attention at recall >= {RECALL_MIN:g} and "
                         f"relative error <= {REL_ERROR_MAX:g}.")
        else:
            at = ", ".join(f"T={d.T}: {d.choice}" for d in ds)
            lines.append(f"On {machine} ({device}, {dtype}): {at}. At T={longest.T}: {longest.choice} "
                         + (f"({longest.use.speedup:.2f}x faster than exact at recall {_fmt(longest.use.recall)})."
                            if longest.use else "(exact attention)."))
        for d in ds:
            lines.append("- " + d.sentence())
        if longest.linear is not None:
            lines.append(f"- The linear family computes a different model (it needs training or conversion); its "
                         f"fastest row at T={longest.T} is {longest.linear.label}, {longest.linear.speedup:.2f}x exact.")
    timed = [r for r in rows if r["status"] == "ok" and r.get("time_ms")]
    noisy = [r for r in timed if is_noisy(r)]
    unknown = [r for r in timed if spread(r) is None]
    if noisy:
        worst = max(noisy, key=lambda r: spread(r) or 0.0)
        lines.append(f"Warning: noisy timings. {len(noisy)} of {len(timed)} rows have a slowest run more than "
                     f"{NOISY_SPREAD:g}x their fastest (worst: {label(worst)} at T={worst['T']}, "
                     f"{spread(worst):.1f}x). Differences within a row's min-max range are not meaningful; rerun on "
                     "an idle machine or with more --repeats.")
    elif unknown and len(unknown) == len(timed):
        lines.append("Timing spread unknown (one timed run per row, or a results file without min/max).")
    lines.append(f"Fidelity is judged on the structured and real workloads where measured (else on random, flat "
                 f"attention, the hardest case for a sparse method): recall >= {RECALL_MIN:g} and relative error "
                 f"<= {REL_ERROR_MAX:g} (attnkit.bench.advice).")
    return lines


# What each column of the tables means (the report prints it; docs/benchmark.md says more).
COLUMN_HELP = {
    "workload": "the inputs: random (flat attention), structured (locality + planted needles), real (MiniLM's q, k, v)",
    "T": "sequence length (queries = keys, causal)",
    "dtype": "input dtype; accumulation is float32",
    "method": "registered method, or a baseline (sdpa, cudnn, flash, flex) measured on the same inputs",
    "backend": "which executor ran it (attnkit explain says why it was chosen)",
    "options": "the method's options for this row (its example options, plus --set overrides)",
    "time_ms": "median wall time of the timed runs, forward pass, selection included (CUDA events on a GPU)",
    "spread": "fastest - slowest timed run in ms; '!' marks a slowest run more than 1.5x the fastest (noisy); "
              "'1 run' when the time budget allowed only one",
    "select_ms": "the method's selection alone (choosing which keys each query sees)",
    "speedup": "SDPA's median time / this row's, same workload, T and dtype; above 1 is faster than dense SDPA",
    "tflops": "FLOPs of the attention actually computed (visible pairs only) per second",
    "peak_memory_bytes": "peak memory of one call beyond its inputs (CUDA allocator; on CPU live tensor bytes, a lower bound)",
    "rel_error": "relative L2 error of the output against exact float64 attention",
    "cosine": "cosine similarity of the output with exact attention",
    "lse_error": "largest absolute error of the log-sum-exp (where the backend returns it)",
    "recall": "share of the exact attention mass on the keys the method lets each query see (mean over queries)",
    "density": "share of the causal (query, key) pairs computed",
    "needle_hits": "share of the planted (query, needle) pairs the selection keeps (structured workload)",
    "status": "ok, error (with the message) or skipped (with the reason)",
}
