"""The fixed cost of one call: kernel launches, host syncs and sorts per forward and per
forward+backward of each content-routed method, timed against dense attention in the same run.

At short T the routed methods cost a fixed amount per call (launches, syncs that stall the host
until the GPU drains, sorts) that the attention itself does not; this counts them, so a change
that removes them shows up as a number. For each T and each method (`moba`, `nsa`, `dsa`,
`block_topk`, shapes of `benchmarks/sparse_targets_bench.py`) and dense (cuDNN SDPA on a GPU), one
warm call is profiled (`torch.profiler`) and counted:

- `launches`: kernel launches (the `cudaLaunchKernel` / `cuLaunchKernel` runtime calls; GPU only);
- `syncs`: host syncs: the runtime's synchronize calls on a GPU, plus the calls that PyTorch's
  sync debug mode reports (`torch.cuda.set_sync_debug_mode("warn")`);
- `sync_ops`: the aten ops that read a device value back to the host (`.item()`, `int()`,
  `bool()` on a tensor: `aten::_local_scalar_dense`; `nonzero`, `unique`, `masked_select`): on the
  CPU these are what would sync on a GPU;
- `sorts`: `aten::sort`, `aten::topk`, `aten::kthvalue` calls;
- `aten_ops`: every aten op called (the CPU's proxy for launches).

Then the call is timed (median of CUDA events on a GPU, wall clock on the CPU) and divided by the
dense time of the same T. The JSON (`--out`) is rewritten after every row.

    PYTHONPATH=src python benchmarks/launch_count.py --out $OUT/launch_count_h100.json          # GPU
    PYTHONPATH=src python benchmarks/launch_count.py --device cpu --out /tmp/launch_count_cpu.json  # tiny, CPU
    PYTHONPATH=src python benchmarks/launch_count.py --device cpu --interpret --stacks --seqlens 128 --out ...
        # the GPU backends' counts on the CPU (kernels in Triton's interpreter), with where each sync / sort is
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from attnkit.bench.timing import time_call

ROOT = Path(__file__).resolve().parents[1]
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim",
            "aten::unique_consecutive", "aten::masked_select")
SORT_OPS = ("aten::sort", "aten::topk", "aten::kthvalue")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _targets() -> Any:
    """`benchmarks/sparse_targets_bench.py` as a module: its shapes, options and inputs."""
    spec = importlib.util.spec_from_file_location("sparse_targets_bench", Path(__file__).with_name(
        "sparse_targets_bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def call_sites(fn: Callable[[], Any]) -> dict[str, int]:
    """`"op @ file:line"` -> count for every sync op and sort one call of `fn` makes, the line being
    the innermost attnkit frame (a dispatch mode sees each aten op as it is called)."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    found: Counter = Counter()
    watched = set(SYNC_OPS + SORT_OPS)

    class Sites(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            name = func._schema.name
            if name in watched:
                frames = [f for f in traceback.extract_stack() if "/attnkit/" in f.filename]
                site = f"{frames[-1].filename.split('/attnkit/')[-1]}:{frames[-1].lineno}" if frames else "?"
                found[f"{name} @ {site}"] += 1
            return func(*args, **(kwargs or {}))

    with Sites():
        fn()
    return dict(found)


def counts(fn: Callable[[], Any], device: torch.device, stacks: bool = False) -> dict[str, Any]:
    """Launches, syncs, sync ops, sorts and aten ops of one call of `fn` (already warm); with
    `stacks`, the attnkit line that called each sync op and sort."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with profile(activities=acts) as prof:
                fn()
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)  # the profiler's own flush must not count
                    torch.cuda.synchronize()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    events = prof.events()
    names = Counter(e.name for e in events)
    launches = sum(n for name, n in names.items() if "LaunchKernel" in name and name.startswith("cu"))
    sync_calls = sum(names[n] for n in SYNC_CALLS) - (1 if device.type == "cuda" else 0)  # our own flush
    debug = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    return dict(
        launches=launches if device.type == "cuda" else None,
        syncs=max(sync_calls, debug) if device.type == "cuda" else None,
        sync_ops=sum(names[n] for n in SYNC_OPS),
        sync_ops_by_name={n: names[n] for n in SYNC_OPS if names[n]},
        sorts=sum(names[n] for n in SORT_OPS),
        sorts_by_name={n: names[n] for n in SORT_OPS if names[n]},
        aten_ops=sum(n for name, n in names.items() if name.startswith("aten::")),
        attnkit_ops={name: n for name, n in names.items() if name.startswith("attnkit::")},
        called_from=call_sites(fn) if stacks else None,
    )


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of `fn()` over warm runs (CUDA events on a GPU): `attnkit.bench.timing`."""
    return time_call(fn, device, warmup=warmup, repeats=reps, budget_s=float("inf")).median_ms


def calls(name: str, T: int, args: argparse.Namespace, tb: Any, device: torch.device
          ) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(forward, forward+backward) of one method at T; `dense` is SDPA (cuDNN on a GPU)."""
    import attnkit as ak

    if name == "dense":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        hkv = 4
        q = torch.randn(1, args.heads, T, args.head_dim, device=device, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(1, hkv, T, args.head_dim, device=device, dtype=dtype, requires_grad=True)
                for _ in range(2))
        leaves = [q, k, v]

        def fwd() -> torch.Tensor:
            if device.type == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        leaves, opts = tb.method_inputs(name, T, args.heads, args.head_dim, device)
        if device.type != "cuda":  # the CPU has no fast bf16 path: float32 keeps the counts comparable
            leaves = [x.detach().float().requires_grad_() for x in leaves]
            opts = {k: (x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
                    for k, x in opts.items()}
        q, k, v = leaves

        def fwd() -> torch.Tensor:
            if args.interpret:  # the method's GPU backend, its kernels in Triton's CPU interpreter
                from attnkit.core.contract import validate_attention
                from attnkit.registry import get_method, parse_options

                spec = get_method(name)
                call = validate_attention(q, k, v, causal=True)
                return spec.backend("triton").run(call, parse_options(spec, call, opts))
            return ak.attention(q, k, v, method=name, causal=True, **opts)

    def forward() -> Any:
        with torch.no_grad():
            return fwd()

    def forward_backward() -> Any:
        out = fwd()
        return torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)

    return forward, forward_backward


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "command": " ".join([sys.executable] + sys.argv)}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip()
    except OSError:
        info["commit"] = None
    info["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--seqlens", type=int, nargs="+", default=None,
                    help="default 4096 8192 16384 on a GPU, 512 on the CPU")
    ap.add_argument("--methods", nargs="+", default=["moba", "nsa", "dsa", "block_topk"])
    ap.add_argument("--heads", type=int, default=None, help="query heads (default 64 on a GPU, 4 on the CPU)")
    ap.add_argument("--head-dim", type=int, default=None, help="default 128 on a GPU, 16 on the CPU")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--stacks", action="store_true", help="record where each sync op and sort is called")
    ap.add_argument("--interpret", action="store_true",
                    help="CPU only: run each method's GPU backend (`triton`) with its kernels in Triton's "
                         "interpreter, so the counts are those of the GPU path (times are meaningless)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.seqlens = args.seqlens or ([4096, 8192, 16384] if gpu else [512])
    args.heads = args.heads or (64 if gpu else 4)
    args.head_dim = args.head_dim or (128 if gpu else 16)
    warm, reps = args.warmup or (3 if gpu else 1), args.reps or (10 if gpu else 3)
    tb = _targets()
    if args.interpret:
        if gpu:
            ap.error("--interpret runs on the CPU (--device cpu)")
        from attnkit import config, kernels

        with config.triton_interpret_set():
            kernels.load()
        cpu = ("cpu",)
        settings = config.override(routed_topk_devices=cpu, dsa_indexer_devices=cpu, half_gemm_devices=cpu)
        settings.__enter__()  # for the whole run
    if not gpu:  # CPU shapes: the methods' blocks and top-k scaled down with T
        tb.METHODS = {"moba": dict(block_size=32, topk=4), "nsa": dict(block_size=32, topk=4, window=64),
                      "dsa": dict(topk=64), "block_topk": dict(block_size=32, topk=4)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"environment": environment(device), "shapes": dict(
        B=1, Hq=args.heads, D=args.head_dim, Hkv=tb.KV_HEADS, options=tb.METHODS), "rows": []}
    for T in args.seqlens:
        dense_ms: dict[str, float] = {}
        for name in ["dense"] + list(args.methods):
            for mode, fn in zip(("forward", "forward+backward"), calls(name, T, args, tb, device)):
                row: dict[str, Any] = dict(T=T, method=name, mode=mode)
                try:
                    fn()  # warm: compile, autotune
                    row.update(counts(fn, device, args.stacks))
                    if not args.interpret:  # interpreter times say nothing about a GPU
                        row["ms"] = timed(fn, device, warm, reps)
                    if name == "dense" and "ms" in row:
                        dense_ms[mode] = row["ms"]
                    elif mode in dense_ms and "ms" in row:
                        row["vs_dense"] = row["ms"] / dense_ms[mode]
                except Exception as e:  # a method that fails is a row, not the end of the run
                    row["error"] = f"{type(e).__name__}: {e}"[:400]
                result["rows"].append(row)
                out.write_text(json.dumps(result, indent=2, default=str))
                print(json.dumps({k: row.get(k) for k in ("T", "method", "mode", "launches", "syncs", "sync_ops",
                                                          "sorts", "aten_ops", "ms", "vs_dense", "error")}),
                      flush=True)
            if gpu:
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
