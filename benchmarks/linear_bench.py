"""Time the linear/recurrent family on a GPU: PyTorch chunked form, fla, dense causal SDPA.

    PYTHONPATH=src python benchmarks/linear_bench.py --out results/linear_h100.json

Shape: bf16, B = 1, H = 16, K = V = 128, T in {8192, 32768}. For each method:
forward and forward+backward of attnkit's PyTorch chunked form (eager, and `torch.compile`
where the time budget allows), of fla's chunked kernels (attnkit's `fla` backend), and of cuDNN
dense causal attention (`scaled_dot_product_attention`, cuDNN backend) at the same shape.
Times are the median of CUDA-event timings after warm-up. Before timing, each method's fla and
PyTorch outputs are compared at the timed shape (relative max error of the forward outputs). The JSON is rewritten after
every measurement so that a run cut short still leaves its numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

import attnkit.linear as L
from attnkit.bench.timing import time_call
from attnkit.linear.chunk import chunk_forward

METHODS = ["linear_attention", "simple_gla", "gla", "delta_rule", "gated_delta_rule", "kda"]


def inputs(name: str, T: int, H: int, D: int, grad: bool) -> dict[str, torch.Tensor]:
    """The same tensors for every implementation of a (method, T): the cross-check compares like with like."""
    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(T)
    x = {key: torch.randn(1, T, H, D, device=dev, dtype=bf) for key in ("q", "k", "v")}
    if name in ("simple_gla", "gated_delta_rule"):
        x["g"] = F.logsigmoid(torch.randn(1, T, H, device=dev)) / 16
    if name in ("gla", "kda"):
        x["g"] = F.logsigmoid(torch.randn(1, T, H, D, device=dev)) / 16
    if name in ("delta_rule", "gated_delta_rule", "kda"):
        x["beta"] = torch.sigmoid(torch.randn(1, T, H, device=dev)).to(bf)
    for t in x.values():
        t.requires_grad_(grad)
    return x


def call(name: str, x: dict[str, torch.Tensor], backend: str, chunk_size: int = 64) -> torch.Tensor:
    q, k, v = x["q"], x["k"], x["v"]
    kw: dict[str, Any] = dict(backend=backend, chunk_size=chunk_size)
    if name == "linear_attention":
        return L.linear_attention(q, k, v, **kw)[0]
    if name == "simple_gla":
        return L.simple_gla(q, k, v, x["g"], **kw)[0]
    if name == "gla":
        return L.gla(q, k, v, x["g"], **kw)[0]
    l2 = dict(use_qk_l2norm_in_kernel=True)
    if name == "delta_rule":
        return L.delta_rule(q, k, v, x["beta"], **l2, **kw)[0]
    if name == "gated_delta_rule":
        return L.gated_delta_rule(q, k, v, x["g"], x["beta"], **l2, **kw)[0]
    return L.kda(q, k, v, x["g"], x["beta"], **l2, **kw)[0]


def timeit(fn: Callable[[], Any], warmup: int = 2, reps: int = 7) -> float:
    """Median CUDA-event milliseconds of `reps` runs after `warmup` (the benchmark's own timer)."""
    return time_call(fn, torch.device("cuda"), warmup=warmup, repeats=reps, budget_s=float("inf")).median_ms


def fwd_bwd(run: Callable[[dict[str, torch.Tensor]], torch.Tensor], x: dict[str, torch.Tensor]) -> Callable[[], Any]:
    def go() -> None:
        o = run(x)
        o.backward(torch.ones_like(o))
        for t in x.values():
            t.grad = None

    return go


def measure(res: list, out: str, meta: dict, **row: Any) -> None:
    res.append(row)
    print(json.dumps(row), flush=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "results": res}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/linear_h100.json")
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="stop starting fla / torch.compile measurements past this many seconds")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the chunked engine")
    ap.add_argument("--warm-fla", action="store_true",
                    help="only run fla's forward+backward once per method and T (fills Triton's kernel cache: "
                         "run one process per method in parallel before the timed run)")
    args = ap.parse_args()
    t0 = time.time()
    H, D = 16, 128
    import fla  # noqa: F401  (the run needs fla; fail loudly otherwise)

    if args.warm_fla:
        for name in args.methods:
            for T in args.T:
                x = inputs(name, T, H, D, grad=True)
                try:
                    fwd_bwd(lambda y: call(name, y, "fla"), x)()
                    torch.cuda.synchronize()
                    print(f"warm {name} T={T}: ok at {time.time() - t0:.0f}s", flush=True)
                except Exception as e:  # the timed run records failures
                    print(f"warm {name} T={T}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return

    meta = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "fla": getattr(fla, "__version__", "?"),
        "python": platform.python_version(), "shape": {"B": 1, "H": H, "K": D, "V": D}, "dtype": "bf16",
        "timing": "median of 7 CUDA-event timings after 2 warm-ups, ms; fla's Triton autotuning happens in the "
                  "warm-up (its keys hold H, K, V, not T)",
        "command": "python " + " ".join(__import__("sys").argv),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    res: list = []
    outputs: dict = {}  # (method, T) -> forward output of the chunked form, for the fla cross-check

    def time_impl(name: str, T: int, impl: str) -> None:
        try:
            x = inputs(name, T, H, D, grad=True)
            with torch.no_grad():
                fwd = timeit(lambda: call(name, x, impl))
                o = call(name, x, impl).float()
            row: dict[str, Any] = dict(kind="time", method=name, impl=impl, T=T, fwd_ms=fwd)
            if impl == "chunk":
                outputs[(name, T)] = o
            elif (name, T) in outputs:
                ref = outputs[(name, T)]
                row["rel_max_err_vs_chunk"] = ((o - ref).abs().max() / ref.abs().max()).item()
            del o
            try:
                row["fwd_bwd_ms"] = timeit(fwd_bwd(lambda y: call(name, y, impl), x))
            except Exception as e:  # fla refuses some backward passes on some Triton versions: record why
                row["fwd_bwd_error"] = f"{type(e).__name__}: {e}"[:300]
            row["peak_gib_so_far"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            measure(res, args.out, meta, **row)
        except Exception as e:  # OOM or an fla failure: record, keep going
            measure(res, args.out, meta, kind="time", method=name, impl=impl, T=T,
                    error=f"{type(e).__name__}: {e}"[:300])
        finally:
            x = None
            torch.cuda.empty_cache()

    from torch.nn.attention import SDPBackend, sdpa_kernel

    for T in args.T:
        # dense causal attention at the same shape: cuDNN through SDPA
        qd, kd, vd = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        try:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                f = lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)  # noqa: E731
                with torch.no_grad():
                    fwd = timeit(f)
                measure(res, args.out, meta, kind="time", method="dense_sdpa_cudnn", impl="sdpa-cudnn", T=T,
                        fwd_ms=fwd, fwd_bwd_ms=timeit(lambda: f().backward(torch.ones_like(qd))))
        except Exception as e:  # record, keep going
            measure(res, args.out, meta, kind="time", method="dense_sdpa_cudnn", impl="sdpa-cudnn", T=T,
                    error=f"{type(e).__name__}: {e}"[:300])
        del qd, kd, vd
        for name in args.methods:  # the PyTorch chunked form first: cheap, and the reference of the cross-check
            time_impl(name, T, "chunk")

    for name in args.methods:  # fla: its first call per method autotunes (minutes), so under a budget
        for T in args.T:
            if time.time() - t0 > args.budget_s:
                measure(res, args.out, meta, kind="time", method=name, impl="fla", T=T,
                        error="skipped: benchmark time budget spent (fla autotuning)")
                continue
            time_impl(name, T, "fla")

    if args.compile:  # torch.compile of the chunked engine (compile time is recorded)
        for name in ("simple_gla", "gla"):
            for T in args.T:
                if time.time() - t0 > args.budget_s:
                    measure(res, args.out, meta, kind="time", method=name, impl="chunk-compile", T=T,
                            error="skipped: benchmark time budget spent")
                    continue
                try:
                    engine = torch.compile(chunk_forward, dynamic=False)
                    x = inputs(name, T, H, D, grad=True)
                    run = lambda y: engine(y["q"], y["k"], y["v"], y.get("g"), None, D ** -0.5, None, 64)[0]  # noqa: E731
                    c0 = time.time()
                    with torch.no_grad():
                        run(x)
                    torch.cuda.synchronize()
                    compile_s = time.time() - c0
                    with torch.no_grad():
                        fwd = timeit(lambda: run(x))
                    fb = timeit(fwd_bwd(run, x))
                    measure(res, args.out, meta, kind="time", method=name, impl="chunk-compile", T=T, fwd_ms=fwd,
                            fwd_bwd_ms=fb, compile_fwd_s=round(compile_s, 1))
                except Exception as e:  # record, keep going
                    measure(res, args.out, meta, kind="time", method=name, impl="chunk-compile", T=T,
                            error=f"{type(e).__name__}: {e}"[:300])
                finally:
                    x = None
                    torch.cuda.empty_cache()
    meta["total_s"] = round(time.time() - t0, 1)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": res}, f, indent=1)


if __name__ == "__main__":
    main()
