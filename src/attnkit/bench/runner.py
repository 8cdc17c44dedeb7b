"""Run the benchmark: every (dtype, workload, length) group, its baselines, then every method.

Each row is one (method or baseline, options, backend, workload, T, dtype) measurement. A row that
fails (an exception, CUDA out of memory) is recorded with its error, never dropped, and the run
goes on. Three guards keep a sweep from stalling: a per-row time budget (`budget_s`: timed runs stop
once their total passes it), an optional limit on one run (`max_run_s`: a row whose single run is
predicted, from the same method at a shorter length, to take longer is skipped and says so), and
an optional deadline for the whole run (`max_minutes`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from ..core.contract import AttentionCall, validate_attention
from ..registry import MethodSpec, choose_backend, get_method, parse_options
from . import metrics, selection_time, visibility
from .baselines import Baseline, for_device
from .capture import Unavailable
from .progress import Progress
from .schema import SCHEMA_VERSION, validate
from .timing import measure, time_call
from .workloads import Shape, Workload, random_workload, real_workload, structured_workload

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
REAL_SEQLEN = 512


@dataclass
class Config:
    """Everything that decides what a run measures (recorded in the results file)."""

    preset: str
    device: torch.device
    methods: list[str]
    seqlens: list[int]
    dtypes: list[torch.dtype]
    workloads: list[str]
    shape: Shape = field(default_factory=Shape)
    warmup: int = 1
    repeats: int = 5
    budget_s: float = 10.0
    max_run_s: Optional[float] = None  # skip a row whose single run is predicted to take longer
    max_minutes: Optional[float] = None
    fidelity_max_t: Optional[int] = None
    # "auto": the dispatcher's choice; "all": every backend that can serve the call; else comma-separated
    # backend names: a row for each named backend of the method
    backends: str = "auto"
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    baselines: bool = True
    backward: bool = False  # time forward + backward (inputs require grad; the loss is the output's sum)
    causal: bool = True
    seed: int = 0
    cache_dir: Optional[str] = None
    study: str = "prefill"  # "decode": `bench.decode.DecodeRunner` measures it

    def describe(self) -> dict[str, Any]:
        return {
            "preset": self.preset, "device": str(self.device), "methods": self.methods, "seqlens": self.seqlens,
            "dtypes": [DTYPE_NAMES[d] for d in self.dtypes], "workloads": self.workloads,
            "shape": dataclasses.asdict(self.shape), "real_seqlen": REAL_SEQLEN, "warmup": self.warmup,
            "repeats": self.repeats, "budget_s": self.budget_s, "max_run_s": self.max_run_s,
            "max_minutes": self.max_minutes,
            "fidelity_max_t": self.fidelity_max_t, "backends": self.backends,
            "overrides": {m: json_options(o) for m, o in self.overrides.items()}, "baselines": self.baselines,
            "causal": self.causal, "seed": self.seed, "grad": self.backward, "study": self.study,
        }


def json_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options as JSON values (tensors by shape)."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, torch.Tensor):
            out[k] = f"Tensor{tuple(v.shape)}"
        elif isinstance(v, (tuple, list)):
            out[k] = [x if isinstance(x, (int, float, str, bool)) or x is None else str(x) for x in v]
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        else:
            out[k] = str(v)
    return out


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(e, oom)) or "out of memory" in str(e).lower()


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN or infinity: such values become None, with a note."""
    out = dict(row)
    for key, val in row.items():
        if isinstance(val, float) and not math.isfinite(val):
            out[key] = None
            out["notes"] = [*out["notes"], f"{key} was {val}"]
    return out


def new_row(**fields: Any) -> dict[str, Any]:
    """A row with every schema key, unknown values None."""
    row: dict[str, Any] = {
        "method": None, "family": None, "kind": "method", "backend": None, "options": {}, "workload": None,
        "T": None, "batch": None, "heads_q": None, "heads_kv": None, "head_dim": None, "dtype": None,
        "device": None, "causal": True, "pass": "forward", "status": "ok", "error": None, "notes": [], "time_ms": None,
        "time_min_ms": None, "time_max_ms": None,
        "select_ms": None, "repeats": 0, "flops": None, "tflops": None, "peak_memory_bytes": None, "memory_measure": None,
        "rel_error": None, "cosine": None, "lse_error": None, "recall": None, "recall_min": None,
        "density": None, "needle_hits": None, "speedup": None, "fidelity_note": None, "recall_source": None,
    }
    row.update(fields)
    return row


@dataclass
class _Group:
    """One (dtype, workload, T) with its lazily computed exact reference."""

    workload: Workload
    dtype: torch.dtype
    causal: bool
    fidelity: bool
    _ref: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def T(self) -> int:
        return self.workload.seqlen

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ref is None:
            w = self.workload
            self._ref = metrics.exact_reference(w.q, w.k, w.v, self.causal)
        return self._ref


class Runner:
    def __init__(self, config: Config, progress: bool = True,
                 checkpoint: Optional[Callable[[dict[str, Any]], None]] = None) -> None:
        self.cfg = config
        self.rows: list[dict[str, Any]] = []
        self.workload_log: list[dict[str, Any]] = []
        self.progress_enabled = progress
        self.checkpoint = checkpoint
        self.last_time: dict[tuple, tuple[int, float]] = {}  # (name, backend, workload, dtype) -> (T, s/run)
        self.start = time.monotonic()
        self.baselines: list[Baseline] = for_device(config.device) if config.baselines else []
        self.specs = [get_method(m) for m in config.methods]

    # --- planning ---------------------------------------------------------------------------

    def _groups(self) -> Iterator[tuple[torch.dtype, str, int]]:
        """Shortest lengths first (across workloads), so a deadline cuts the longest, slowest groups."""
        groups = [(T, d, wi, name) for d, dtype in enumerate(self.cfg.dtypes)
                  for wi, name in enumerate(self.cfg.workloads)
                  for T in ([REAL_SEQLEN] if name == "real" else self.cfg.seqlens)]
        for T, d, _, name in sorted(groups):
            yield self.cfg.dtypes[d], name, T

    def plan(self) -> str:
        n = len(list(self._groups()))
        return f"{len(self.specs)} methods + {len(self.baselines)} baselines over {n} (dtype, workload, T) groups"

    def _named_backends(self, spec: MethodSpec) -> Optional[list[str]]:
        """The backends named by `--backends` that the method has (None for auto / all)."""
        if self.cfg.backends in ("auto", "all"):
            return None
        names = self.cfg.backends.split(",")
        return [b.name for b in spec.backends if b.name in names]

    def _planned(self, spec: MethodSpec) -> int:
        named = self._named_backends(spec)
        if named is not None:
            return max(1, len(named))
        return len(spec.backends) if self.cfg.backends == "all" else 1

    def _rows_per_group(self) -> int:
        return len(self.baselines) + sum(self._planned(s) for s in self.specs)

    def _build(self, name: str, T: int, dtype: torch.dtype) -> Workload:
        c, dev = self.cfg, self.cfg.device
        if name == "random":
            return random_workload(T, c.shape, dtype, dev, c.seed)
        if name == "structured":
            return structured_workload(T, c.shape, dtype, dev, c.seed)
        return real_workload(dtype, dev, c.cache_dir)

    # --- the run ------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        groups = list(self._groups())
        bar = Progress(len(groups) * self._rows_per_group(), self.progress_enabled)
        real_status: dict[str, Any] = {}
        self._warm_up()
        try:
            with torch.no_grad():
                for dtype, name, T in groups:
                    label = f"{name} T={T} {DTYPE_NAMES[dtype]}"
                    bar.group(label)
                    try:
                        wl = self._build(name, T, dtype)
                    except Exception as e:  # Unavailable (no eval extra), or e.g. out of memory at a long T
                        reason = str(e) if isinstance(e, Unavailable) else f"T={T} {DTYPE_NAMES[dtype]}: {_one_line(e)}"
                        if name not in real_status:
                            real_status[name] = reason
                            bar.write(f"attnkit bench: workload {name!r} skipped: {reason}")
                        bar.add(-self._rows_per_group())
                        _free(self.cfg.device)
                        continue
                    self._log_workload(wl)
                    fid = self.cfg.fidelity_max_t is None or T <= self.cfg.fidelity_max_t
                    self._run_group(_Group(wl, dtype, self.cfg.causal, fid), bar)
                    del wl
                    _free(self.cfg.device)
        finally:
            bar.close()
        for name, reason in real_status.items():  # a workload that ran at other lengths is also listed as ok
            self.workload_log.append({"name": name, "status": "skipped", "description": reason})
        return self.rows

    def _warm_up(self) -> None:
        """One small untimed attention call, so thread pools and lazy initialisation are not billed to the first row."""
        x = torch.randn(1, 64, 2, 32, device=self.cfg.device)
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
        if self.cfg.device.type == "cuda":
            torch.cuda.synchronize(self.cfg.device)

    def _log_workload(self, wl: Workload) -> None:
        if any(w["name"] == wl.name for w in self.workload_log):
            return
        entry: dict[str, Any] = {"name": wl.name, "status": "ok", "description": wl.description}
        if wl.meta:
            entry["meta"] = {k: v for k, v in wl.meta.items() if isinstance(v, (str, int, float, bool))}
        if wl.needles is not None:
            entry["needles"] = wl.needles.tolist()
        self.workload_log.append(entry)

    def _base_row(self, g: _Group, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **fields: Any) -> dict[str, Any]:
        return new_row(workload=g.workload.name, T=g.T, batch=q.shape[0], heads_q=q.shape[2], heads_kv=k.shape[2],
                       head_dim=q.shape[3], dtype=DTYPE_NAMES[g.dtype], device=self.cfg.device.type,
                       causal=g.causal, **{"pass": "forward+backward" if self.cfg.backward else "forward"}, **fields)

    def _timed(self, forward: Callable[[], Any], leaves: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
        """What a row times: `forward`, or with `backward` set, forward then backward of the output's sum
        (gradients of the previous run dropped first, so nothing accumulates)."""
        if not self.cfg.backward:
            return forward

        def step() -> None:
            for t in leaves:
                t.grad = None
            with torch.enable_grad():
                out = forward()
                (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        return step

    def _grad_leaves(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Inputs as leaves that require grad (backward timing), else as they are."""
        if not self.cfg.backward:
            return xs
        return tuple(x.detach().requires_grad_(True) for x in xs)

    def _run_group(self, g: _Group, bar: Progress) -> None:
        """Measure one (workload, T, dtype) group. Rows join `self.rows` as they are measured and
        the checkpoint is written after each one, so a run killed mid-group (a wall-clock limit, an
        out-of-memory crash) keeps everything it measured."""
        first = len(self.rows)

        def add(row: dict[str, Any]) -> None:
            self.rows.append(row)
            sdpa = next((r for r in self.rows[first:] if r["method"] == "sdpa" and r["time_ms"]), None)
            if sdpa is not None and row["time_ms"]:
                row["speedup"] = sdpa["time_ms"] / row["time_ms"]
            if self.checkpoint is not None:
                self.checkpoint(self.document())

        for b in self.baselines:
            add(self._baseline_row(g, b))
            bar.step(b.name)
        for spec in self.specs:
            for row in self._method_rows(g, spec, bar):
                add(row)

    # --- guards -------------------------------------------------------------------------------

    def _over_deadline(self) -> Optional[str]:
        if self.cfg.max_minutes is None:
            return None
        if time.monotonic() - self.start > 60.0 * self.cfg.max_minutes:
            return f"the run's time limit (--max-minutes {self.cfg.max_minutes:g}) was reached"
        return None

    def _predicted_too_slow(self, key: tuple, T: int, exponent: float) -> Optional[str]:
        limit = self.cfg.max_run_s
        if limit is None or key not in self.last_time:
            return None
        T0, t0 = self.last_time[key]
        predicted = t0 * (T / T0) ** exponent
        if T > T0 and predicted > limit:
            return (f"one run predicted to take {predicted:.1f} s (from {t0:.2f} s at T={T0}, time ~ T^{exponent:g}), "
                    f"over --max-run-seconds {limit:g}")
        return None

    # --- measurement ------------------------------------------------------------------------------

    def _measure(self, row: dict[str, Any], fn: Callable[[], Any], key: tuple, exponent: float,
                 first: Optional[Callable[[], Any]] = None) -> tuple[bool, Any]:
        """Time and peak memory of `fn` into `row`. Returns (ok, result of `first` if it was run);
        ok is False (and the row marked) when the row failed or was skipped."""
        dev = self.cfg.device
        reason = self._over_deadline() or self._predicted_too_slow(key, row["T"], exponent)
        if reason:
            row.update(status="skipped", error=reason)
            return False, None
        try:
            timing, peak, how, first_out = measure(fn, dev, self.cfg.warmup, self.cfg.repeats, self.cfg.budget_s, first)
            row.update(time_ms=timing.median_ms, time_min_ms=timing.min_ms, time_max_ms=timing.max_ms, repeats=timing.runs, peak_memory_bytes=peak, memory_measure=how)
            self.last_time[key] = (row["T"], timing.median_ms / 1e3)
            return True, first_out
        except Exception as e:  # recorded in the row; the run goes on
            row.update(status="error", error=("out of memory: " if _is_oom(e) else "") + _one_line(e))
        _free(dev)  # outside the handler, so the traceback no longer holds the failed call's tensors
        return False, None

    def _fidelity(self, row: dict[str, Any], g: _Group, out: torch.Tensor, lse: Optional[torch.Tensor]) -> None:
        ref_out, ref_lse = g.reference()
        f = metrics.fidelity(out, ref_out, lse, ref_lse if lse is not None else None)
        row.update(rel_error=f.rel_error, cosine=f.cosine, lse_error=f.lse_error)
        if f.empty_rows:
            row["notes"].append(f"{f.empty_rows} rows see no key (LSE -inf) where exact attention sees some")

    def _baseline_row(self, g: _Group, b: Baseline) -> dict[str, Any]:
        w = g.workload
        row = self._base_row(g, w.q, w.k, w.v, method=b.name, family="exact", kind="baseline", backend=b.name)
        why = b.why_not(w.q)
        if why:
            row.update(status="skipped", error=why)
            return row
        scale = w.q.shape[-1] ** -0.5
        leaves = self._grad_leaves(w.q, w.k, w.v)
        try:
            fn = b.make(*leaves, g.causal, scale)
        except Exception as e:
            row.update(status="error", error=_one_line(e))
            return row
        first = fn if g.fidelity and not self.cfg.backward else None
        ok, first_out = self._measure(row, self._timed(fn, leaves), (b.name, b.name, w.name, g.dtype), 2.0, first=first)
        if not ok and row["status"] == "error" and "No available kernel" in (row["error"] or ""):
            # a forced SDPA kernel that does not serve these inputs (e.g. GQA on the memory-efficient one)
            # is a baseline that does not apply here, not a failure of the run
            row.update(status="skipped", error=f"this kernel cannot serve these inputs ({row['error']})")
        if not ok:
            return row
        pairs = metrics.visible_pairs_causal(w.q.shape[0], w.q.shape[2], w.q.shape[1], w.k.shape[1], g.causal)
        row["flops"] = metrics.attention_flops(pairs, w.q.shape[3], w.v.shape[3])
        row["tflops"] = row["flops"] / (row["time_ms"] * 1e-3) / 1e12
        row.update(recall=1.0, recall_min=1.0, density=1.0, recall_source="exact")
        if w.needles is not None:
            row["needle_hits"] = 1.0
        if g.fidelity:
            try:
                self._fidelity(row, g, first_out if first_out is not None else fn(), None)
                row["fidelity_note"] = "no LSE from this kernel"
            except Exception as e:
                row["notes"].append(f"fidelity failed: {_one_line(e)}")
        else:
            row["fidelity_note"] = f"fidelity not computed above T={self.cfg.fidelity_max_t}"
        return row

    def _inputs_for(self, spec: MethodSpec, w: Workload) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        """The workload's inputs, with KV heads repeated for methods without GQA (same attention)."""
        q, k, v = w.q, w.k, w.v
        if not spec.capabilities.gqa and q.shape[2] != k.shape[2]:
            rep = q.shape[2] // k.shape[2]
            return q, k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2), [
                f"k, v heads repeated {rep}x to Hq={q.shape[2]} (method has no GQA)"]
        return q, k, v, []

    def _method_rows(self, g: _Group, spec: MethodSpec, bar: Progress) -> list[dict[str, Any]]:
        w = g.workload
        q, k, v, notes = self._inputs_for(spec, w)
        q, k, v = self._grad_leaves(q, k, v)
        template = self._base_row(g, q, k, v, method=spec.name, family=spec.family, notes=list(notes))
        n_planned = self._planned(spec)

        def fail(msg: str) -> list[dict[str, Any]]:
            template.update(status="error", error=msg)
            bar.add(1 - n_planned)
            bar.step(spec.name)
            return [template]

        try:
            call = validate_attention(q, k, v, causal=g.causal)
            options = dict(spec.example(call))
        except Exception as e:
            return fail(f"example options failed: {_one_line(e)}")
        options.update(self.cfg.overrides.get(spec.name, {}))
        template["options"] = json_options(options)
        try:
            with torch.set_grad_enabled(self.cfg.backward):  # backward timing: forward-only backends drop out
                exp = choose_backend(spec, call, parse_options(spec, call, options))
        except Exception as e:
            return fail(_one_line(e))
        named = self._named_backends(spec)
        if named is not None:  # a named backend that cannot serve this call is a skipped row, with the reason
            verdict = {n: (ok, why) for n, ok, why in exp.rows}
            backends = [n for n in named if verdict.get(n, (False, ""))[0]]
            if not backends:
                template.update(status="skipped", error="; ".join(f"backend {n}: {verdict.get(n, (0, '?'))[1]}"
                                                                  for n in named))
                bar.add(1 - n_planned)
                bar.step(spec.name)
                return [template]
        elif self.cfg.backends == "all":
            backends = [name for name, ok, _ in exp.rows if ok]
        else:
            backends = [exp.chosen] if exp.chosen else []
        if not backends:
            return fail("no backend can run this call: " + "; ".join(f"{n}: {r}" for n, _, r in exp.rows))
        bar.add(len(backends) - n_planned)
        cache: list[tuple[Optional[metrics.SelectionStats], str]] = []

        def stats() -> tuple[Optional[metrics.SelectionStats], str]:  # once per method, only if a row ran
            if not cache:
                cache.append(self._selection(g, spec, call, options))
            return cache[0]

        sel_cache: list[tuple[Optional[float], Optional[str]]] = []

        def select_ms() -> tuple[Optional[float], Optional[str]]:  # once per method, only if a row ran
            if not sel_cache:
                sel_cache.append(self._selection_time(spec, call, options))
            return sel_cache[0]

        rows = []
        for backend in backends:
            row = {**template, "notes": list(template["notes"]), "backend": backend}
            self._method_row(row, g, spec, call, options, backend, stats)
            if row["status"] == "ok":
                row["select_ms"], note = select_ms()
                if note:
                    row["notes"].append(note)
            rows.append(row)
            bar.step(f"{spec.name}[{backend}]")
        return rows

    def _selection_time(self, spec: MethodSpec, call: AttentionCall,
                        options: dict[str, Any]) -> tuple[Optional[float], Optional[str]]:
        """Median ms of the method's selection alone (`selection_time.selection_fn`), timed like the
        row (CUDA events on CUDA, same warm-up, repeats and budget). `(None, None)` for a method
        without a separate selection; `(None, why)` when it could not be timed."""
        try:
            fn = selection_time.selection_fn(spec, call, options)
        except Exception as e:
            return None, f"select_ms n/a: {_one_line(e)}"
        if fn is None:
            return None, None
        reason = self._over_deadline()
        if reason:
            return None, f"select_ms not measured: {reason}"
        try:
            timing = time_call(fn, self.cfg.device, self.cfg.warmup, self.cfg.repeats, self.cfg.budget_s)
            return timing.median_ms, None
        except Exception as e:
            note = f"select_ms failed: {('out of memory: ' if _is_oom(e) else '') + _one_line(e)}"
        _free(self.cfg.device)
        return None, note

    def _selection(self, g: _Group, spec: MethodSpec, call: AttentionCall,
                   options: dict[str, Any]) -> tuple[Optional[metrics.SelectionStats], str]:
        """Recall, density and needle hits of the method's visibility (None and why, when unknown)."""
        w = g.workload
        if not g.fidelity and spec.family != "exact":
            return None, f"recall not computed above T={self.cfg.fidelity_max_t}"
        try:
            vis, source = visibility.resolve(spec, call, options)
        except Exception as e:
            return None, f"selection failed: {_one_line(e)}"
        if vis is None:
            return None, source
        if vis.source == "exact":
            pairs = metrics.visible_pairs_causal(call.batch, call.hq, call.tq, call.tk, call.causal)
            hits = 1.0 if w.needles is not None else None
            return metrics.SelectionStats(1.0, 1.0, 1.0, pairs, hits), "exact"
        try:
            return metrics.selection_stats(vis, call.q, call.k, call.scale, w.needles), source
        except Exception as e:
            return None, f"recall failed: {('out of memory: ' if _is_oom(e) else '') + _one_line(e)}"

    def _method_row(self, row: dict[str, Any], g: _Group, spec: MethodSpec, call: AttentionCall,
                    options: dict[str, Any], backend: str,
                    selection_stats: Callable[[], tuple[Optional[metrics.SelectionStats], str]]) -> None:
        import attnkit as ak

        q, k, v = call.q, call.k, call.v

        def fn() -> Any:
            return ak.attention(q, k, v, method=spec.name, causal=g.causal, backend=backend, **options)

        with_lse = spec.capabilities.lse and spec.backend(backend).lse
        fidelity = spec.family != "linear" and g.fidelity

        def fid_fn() -> Any:  # the same call, returning the LSE too where the backend can
            return ak.attention(q, k, v, method=spec.name, causal=g.causal, backend=backend, return_lse=with_lse, **options)

        exponent = 1.0 if spec.family == "linear" else 2.0
        key = (spec.name, backend, g.workload.name, g.dtype)
        first = fid_fn if fidelity and not self.cfg.backward else None
        ok, first_out = self._measure(row, self._timed(fn, (q, k, v)), key, exponent, first=first)
        if not ok:
            return
        stats, stats_note = selection_stats()
        if stats is not None:
            row.update(recall=stats.recall, recall_min=stats.recall_min, density=stats.density,
                       needle_hits=stats.needle_hits, recall_source=stats_note)
            row["flops"] = metrics.attention_flops(stats.visible_pairs, call.head_dim, call.head_dim_v)
            row["tflops"] = row["flops"] / (row["time_ms"] * 1e-3) / 1e12
        else:
            row["notes"].append(f"recall, density, FLOPs n/a: {stats_note}")
        if spec.family == "linear":
            row["fidelity_note"] = "linear family: speed and memory only (a different model)"
            return
        if not g.fidelity:
            row["fidelity_note"] = f"fidelity not computed above T={self.cfg.fidelity_max_t}"
            return
        try:
            res = first_out if first_out is not None else fid_fn()
            out, lse = (res if with_lse else (res, None))
            self._fidelity(row, g, out, lse)
            if not with_lse:
                row["fidelity_note"] = f"backend {backend!r} returns no LSE"
        except Exception as e:
            row["notes"].append(f"fidelity failed: {('out of memory: ' if _is_oom(e) else '') + _one_line(e)}")
        _free(self.cfg.device)

    # --- the results document ---------------------------------------------------------------

    def document(self, command: str = "", extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        from . import env

        doc = {
            "schema_version": SCHEMA_VERSION,
            "created": env.timestamp(),
            "command": command or getattr(self, "command", ""),
            "config": self.cfg.describe(),
            "device": env.device_info(self.cfg.device),
            "versions": env.versions(),
            "git": env.git_commit(),
            "workloads": self.workload_log,
            "rows": [_finite(r) for r in self.rows],
        }
        if extra:
            doc["config"].update(extra)
        problems = validate(doc)
        if problems:
            raise AssertionError("results do not match the schema: " + "; ".join(problems[:5]))
        return doc
