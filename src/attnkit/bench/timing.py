"""Time and peak memory of one call.

Time: the median of warm runs (after untimed warm-up runs, which absorb compilation, autotuning and
caches). On CUDA each run is bracketed by CUDA events (device time, no host jitter); on CPU by
`time.perf_counter`. Timed runs stop once their total passes a time budget (at least one is kept), so
a slow row costs about its warm-up plus `budget` seconds.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` during one run minus what was allocated
before it (the working set of the call: its outputs plus every temporary). On CPU PyTorch keeps no
allocator statistics, so a `TorchDispatchMode` tracks every tensor storage created by an ATen op
during the run, and frees it when the storage dies: the peak of live tensor bytes. It excludes
allocator overhead and scratch memory internal to a kernel (for example SDPA's per-thread
buffers), so it is a lower bound of what the process needed.
"""

from __future__ import annotations

import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class Timing:
    """Median and spread of warm runs, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    runs: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for one call; device time on CUDA."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int = 1, repeats: int = 5,
              budget_s: float = 30.0) -> Timing:
    """Median time of up to `repeats` warm runs after `warmup` runs, within about `budget_s` seconds."""
    _sync(device)
    for _ in range(warmup):
        if _run_once(fn, device) > budget_s / 2:  # a slow call is warm after one run; spare the budget
            break
    times: list[float] = []
    for _ in range(max(1, repeats)):
        times.append(_run_once(fn, device))
        if sum(times) > budget_s:
            break
    ms = [t * 1e3 for t in times]
    return Timing(statistics.median(ms), min(ms), max(ms), len(ms))


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks bytes of tensor storages created by ATen ops while active, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in inputs or key in self.live:  # views and in-place results are not new memory
                continue
            self.live[key] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out


def measure(fn: Callable[[], Any], device: torch.device, warmup: int = 1, repeats: int = 5, budget_s: float = 30.0,
            first: Optional[Callable[[], Any]] = None) -> tuple[Timing, Optional[int], str, Any]:
    """Timing and peak memory of `fn`, plus the result of `first` when it was run.

    On CPU the memory is tracked during the first warm-up run (untimed, so the tracking overhead
    costs no accuracy and no extra run); that run calls `first` instead of `fn` when given (the same
    call returning what the fidelity metrics need, e.g. with the LSE), and its result is returned.
    On CUDA the memory is a separate run after the timed ones, so compilation and autotuning buffers
    of the first runs are not counted, and `first` is not run (None is returned)."""
    if device.type == "cpu" and warmup >= 1:
        kept: list[Any] = []

        def tracked() -> Any:
            kept.append((first or fn)())
            return kept[-1]

        peak, how = peak_memory(tracked, device)
        timing = time_call(fn, device, warmup - 1, repeats, budget_s)
        return timing, peak, how, kept[0] if first is not None else None
    timing = time_call(fn, device, warmup, repeats, budget_s)
    peak, how = peak_memory(fn, device)
    return timing, peak, how, None


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[Optional[int], str]:
    """Peak bytes one call needs beyond what was allocated before it, and how it was measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak), "cuda_max_allocated"
    mode = _LiveTensorBytes()
    with mode:
        out = fn()
    del out
    return int(mode.peak), "cpu_live_tensors"
