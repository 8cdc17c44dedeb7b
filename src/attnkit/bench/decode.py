"""The decode study of `attnkit bench --preset decode`: one query token over a paged KV cache.

A decode step reads the whole cache for one token, so its cost is memory traffic, not FLOPs, and
the question differs from prefill's: how fast each backend of `ops.decode_attention` reads a
cache of `T` tokens (against SDPA on the same keys and values, stored contiguously), and what the
Quest reader gains by reading `1 / QUEST_FRACTION` of the pages (time with its selection, error
against the exact step). Rows use the schema of every other run: `T` is the cache length,
`density` the fraction of the cache read, `speedup` the time of SDPA over the row's.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional

import torch

from ..core.contract import AttnkitError
from ..kv.paged import PagedLayerCache
from ..kv.sparse import Quest
from ..ops.decode import decode_attention, plan
from .runner import DTYPE_NAMES, Config, _finite, _one_line, new_row
from .schema import SCHEMA_VERSION, validate
from .timing import measure

QUEST_FRACTION = 8  # Quest reads this fraction of the pages: 1/8
PAGE_SIZE = 16
BACKENDS = ("triton", "sdpa", "reference")  # of ops.decode_attention
WORKLOAD = {"name": "decode", "status": "ok",
            "description": "random q, k, v; one query token after a cache of T tokens (it sees every key)"}


def _rel_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out.double() - exact).norm() / exact.norm().clamp_min(1e-30))


class DecodeRunner:
    """Measures the decode study for every (dtype, T) of `config`, row by row (`checkpoint` gets the
    document after every row, so an interrupted run keeps what it measured)."""

    def __init__(self, config: Config, progress: bool = True,
                 checkpoint: Optional[Callable[[dict[str, Any]], None]] = None) -> None:
        self.cfg = config
        self.progress = progress
        self.checkpoint = checkpoint
        self.rows: list[dict[str, Any]] = []
        self.command = ""

    def _backends(self) -> list[str]:
        if self.cfg.backends in ("all", "auto"):
            return list(BACKENDS) if self.cfg.backends == "all" else ["auto"]
        return [b for b in self.cfg.backends.split(",") if b]

    def plan(self) -> str:
        n = len(self.cfg.dtypes) * len(self.cfg.seqlens) * (1 + 2 * len(self._backends()))
        return f"decode study: {n} rows"

    def run(self) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 60 * self.cfg.max_minutes if self.cfg.max_minutes else None
        for dtype in self.cfg.dtypes:
            for T in self.cfg.seqlens:
                if deadline is not None and time.monotonic() > deadline:
                    self._add(self._row("dense", "exact", None, dtype, T, status="skipped",
                                        error=f"the run's --max-minutes {self.cfg.max_minutes} was reached"))
                    continue
                self._group(dtype, T)
        return self.rows

    def _add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.progress:
            t = f"{row['time_ms']:.3g} ms" if row["time_ms"] is not None else row["error"]
            print(f"  decode T={row['T']} {row['dtype']} {row['method']}[{row['backend']}]: {t}", flush=True)
        if self.checkpoint is not None:
            self.checkpoint(self.document())

    def _row(self, method: str, family: str, backend: Optional[str], dtype: torch.dtype, T: int,
             **fields: Any) -> dict[str, Any]:
        s = self.cfg.shape
        return new_row(method=method, family=family, backend=backend, workload="decode", T=T, batch=s.batch,
                       heads_q=s.heads_q, heads_kv=s.heads_kv, head_dim=s.head_dim, dtype=DTYPE_NAMES[dtype],
                       device=self.cfg.device.type, notes=["one decode token"], **fields)

    def _time(self, row: dict[str, Any], fn: Callable[[], Any]) -> bool:
        try:
            timing, peak, how, _ = measure(fn, self.cfg.device, self.cfg.warmup, self.cfg.repeats, self.cfg.budget_s)
        except Exception as e:
            row.update(status="error", error=_one_line(e))
            return False
        row.update(time_ms=timing.median_ms, time_min_ms=timing.min_ms, time_max_ms=timing.max_ms,
                   repeats=timing.runs, peak_memory_bytes=peak, memory_measure=how)
        return True

    def _group(self, dtype: torch.dtype, T: int) -> None:
        s, dev = self.cfg.shape, self.cfg.device
        gen = torch.Generator(device=dev).manual_seed(self.cfg.seed)  # on the device: a long cache is GBs
        k, v = (torch.randn(s.batch, T, s.heads_kv, s.head_dim, generator=gen, device=dev).to(dtype) for _ in range(2))
        q = torch.randn(s.batch, 1, s.heads_q, s.head_dim, generator=gen, device=dev).to(dtype)
        scale = s.head_dim ** -0.5
        cache = PagedLayerCache(s.batch, s.heads_kv, s.head_dim, page_size=PAGE_SIZE, dtype=dtype, device=dev,
                                capacity_tokens=T)
        cache.append(k, v)
        exact = decode_attention(q.float(), _as_float32(cache, k, v, dev), backend="reference").double()

        # SDPA on the same keys and values, contiguous `[B, H, T, D]`: the baseline of every speedup
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        gqa = s.heads_q != s.heads_kv
        base = self._row("sdpa", "exact", "sdpa", dtype, T, kind="baseline", density=1.0)

        def sdpa() -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=gqa)

        if self._time(base, sdpa):
            base.update(rel_error=_rel_error(sdpa().transpose(1, 2), exact), speedup=1.0)
        self._add(_finite(base))
        sdpa_ms = base["time_ms"]

        pages = math.ceil(T / PAGE_SIZE)
        quest = Quest(topk=max(1, pages // QUEST_FRACTION))
        cache.page_bounds()  # built once when the prompt is cached; a decode step updates one page
        for b in self._backends():
            self._method_row(self._row("dense", "exact", b, dtype, T, density=1.0), q, cache, None, b, exact, sdpa_ms)
            row = self._row("quest", "kv", b, dtype, T, options={"topk": quest.topk, "page_size": PAGE_SIZE},
                            density=min(1.0, quest.topk * PAGE_SIZE / T))
            self._method_row(row, q, cache, quest, b, exact, sdpa_ms)

    def _method_row(self, row: dict[str, Any], q: torch.Tensor, cache: PagedLayerCache, quest: Optional[Quest],
                    backend: str, exact: torch.Tensor, sdpa_ms: Optional[float]) -> None:
        scale = q.shape[-1] ** -0.5
        try:
            sel = quest.select(q, cache, scale) if quest is not None else None
            chosen, _, _ = plan(q, cache, sel, scale=scale, backend=backend)
            row["backend"] = chosen.name
        except AttnkitError as e:
            row.update(status="skipped", error=str(e).splitlines()[0])
            self._add(row)
            return

        def step() -> torch.Tensor:
            s = quest.select(q, cache, scale) if quest is not None else None
            return decode_attention(q, cache, s, scale=scale, backend=backend)

        if self._time(row, step):
            row["rel_error"] = _rel_error(step(), exact)
            if sdpa_ms is not None:
                row["speedup"] = sdpa_ms / row["time_ms"]
            if quest is not None:
                sel_row: dict[str, Any] = {}
                if self._time(sel_row, lambda: quest.select(q, cache, scale)):
                    row["select_ms"] = sel_row["time_ms"]
        self._add(_finite(row))

    def document(self, command: str = "") -> dict[str, Any]:
        from . import env

        doc = {
            "schema_version": SCHEMA_VERSION,
            "created": env.timestamp(),
            "command": command or self.command,
            "config": {**self.cfg.describe(), "page_size": PAGE_SIZE,
                       "quest_fraction": QUEST_FRACTION},
            "device": env.device_info(self.cfg.device),
            "versions": env.versions(),
            "git": env.git_commit(),
            "workloads": [WORKLOAD],
            "rows": [_finite(r) for r in self.rows],
        }
        problems = validate(doc)
        if problems:
            raise AssertionError("results do not match the schema: " + "; ".join(problems[:5]))
        return doc


def _as_float32(cache: PagedLayerCache, k: torch.Tensor, v: torch.Tensor, device: torch.device) -> PagedLayerCache:
    """The same tokens in a float32 cache: the exact step (float32 reference) that `rel_error` compares
    against; float32 rather than float64 so that the copy of a long cache fits next to it on a GPU."""
    out = PagedLayerCache(k.shape[0], k.shape[2], k.shape[3], page_size=cache.page_size, dtype=torch.float32,
                          device=device, capacity_tokens=k.shape[1])
    out.append(k.float(), v.float())
    return out
