"""`attnkit bench` (also `python -m attnkit.bench`): measure every registered method side by side.

    attnkit bench --quick                      # CPU, every method, small sizes (the default)
    attnkit bench --gpu                        # CUDA, T from 1K to 128K, bf16, with SDPA/Flex baselines
    attnkit bench --methods dense,moba --seqlens 1K,4K --dtype bf16 --out results/mine
    attnkit bench --set sliding_window.window=4096 ...   # override an option of a method
    attnkit bench --import mypackage.attention --methods mine  # a method registered by your own module
    attnkit bench --preset sparse-targets              # a GPU study: see `PRESETS`

Exit status: 2 for a bad argument or an impossible combination (one line on stderr, before any
work); 1 when a row failed at run time (the run still measures every row and writes every file),
unless `--keep-going`; 0 otherwise. See docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any, Optional

import torch

# packages whose import registers methods (the benchmark runs whatever they register)
REGISTERING = ("attnkit.methods", "attnkit.linear")


class UsageError(Exception):
    """A bad argument; the message is the one line printed."""


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named study: every setting a run needs, so a GPU study is one `attnkit bench --preset NAME`
    writing the same results schema as every other run. Command-line options override its fields."""

    device: str
    seqlens: tuple[int, ...]
    dtypes: tuple[str, ...]
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    warmup: int
    repeats: int
    budget: float
    max_run: Optional[float]
    max_minutes: Optional[float]
    fidelity_max_t: Optional[int]
    backends: str
    methods: str = "all"
    workloads: Optional[str] = None  # None: every workload
    overrides: tuple[str, ...] = ()  # --set items
    about: str = ""
    study: str = "prefill"  # "decode": one token over a paged KV cache (`bench.decode`), methods and workloads fixed


_SPARSE = "block_topk,moba,nsa,dsa"
_LINEAR = "linear_attention,simple_gla,lightning_attention,gla,delta_rule,gated_delta_rule,kda"

PRESETS = {
    "quick": Preset("cpu", (256, 512), ("fp32",), 1, 8, 2, 64, 1, 5, 1.0, None, None, None, "auto",
                    about="CPU, every registered method, T=256,512 plus the real 512-token workload, fp32; "
                          "about a minute on 2 cores"),
    "gpu": Preset("cuda", tuple(1024 * 2**i for i in range(8)), ("bf16",), 1, 16, 4, 128, 2, 10, 5.0, 10.0, 9.0, 32768,
                  "all", about="one GPU: every method and backend, T=1K..128K, bf16, B=1 Hq=16 Hkv=4 D=128, "
                               "SDPA/cuDNN/flash/Flex baselines; bounded to 9 minutes"),
    "sparse-targets": Preset("cuda", (4096, 16384, 65536), ("bf16",), 1, 64, 4, 128, 2, 5, 5.0, 20.0, 7.0, 16384,
                             "all", methods="dense," + _SPARSE, workloads="random,structured",
                             about="content-routed sparse methods against exact attention at the long lengths "
                                   "they target: Hq=64 Hkv=4 D=128, T=4K,16K,64K, bf16, every backend"),
    "linear": Preset("cuda", (2048, 8192, 32768), ("bf16",), 1, 16, 16, 128, 2, 5, 5.0, 10.0, 7.0, None, "all",
                     methods="dense," + _LINEAR, workloads="random",
                     about="the linear family on every backend (fla, chunk) against exact attention: "
                           "Hq=Hkv=16 D=128, T=2K,8K,32K, bf16"),
    "executors": Preset("cuda", (4096, 16384, 65536), ("bf16",), 1, 16, 4, 128, 2, 5, 5.0, 20.0, 7.0, 16384, "all",
                        methods="dense,sliding_window,dilated,strided,power,stochastic," + _SPARSE,
                        workloads="random",
                        about="every softmax-family method on every executor (reference, flex, triton) at "
                              "T=4K,16K,64K: which executor dispatch should prefer"),
    "decode": Preset("cuda", (32768, 131072), ("bf16",), 8, 32, 8, 128, 2, 10, 5.0, None, 7.0, None, "all",
                     methods="dense,quest", workloads="decode", study="decode",
                     about="one decode token over a paged KV cache of T=32K,128K tokens, B=8 Hq=32 Hkv=8 D=128, "
                           "bf16: every decode backend and Quest reading 1/8 of the pages, against SDPA"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("presets")
    g.add_argument("--quick", action="store_true", default=None, help="(the default) " + PRESETS["quick"].about)
    g.add_argument("--gpu", action="store_true", default=None, help="the 'gpu' preset: " + PRESETS["gpu"].about)
    g.add_argument("--preset", help="a named study: " + "; ".join(f"{n}: {p.about}" for n, p in PRESETS.items()))
    s = p.add_argument_group("selection")
    s.add_argument("--methods", help="comma-separated registered method names, or 'all' (default)")
    s.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                   help="import MODULE first (repeatable): it registers methods with attnkit.register_selection")
    s.add_argument("--seqlens", help="comma-separated sequence lengths, e.g. 1K,4K,16384")
    s.add_argument("--dtype", help="comma-separated dtypes: fp16, bf16, fp32, fp64")
    s.add_argument("--workloads", help="comma-separated: random, structured, real (default: all three)")
    s.add_argument("--set", action="append", metavar="METHOD.OPTION=VALUE",
                   help="override a method option (repeatable), e.g. moba.topk=4 or sliding_window.window=4096")
    s.add_argument("--backends", help="'auto' (the dispatcher's choice), 'all' (a row per backend that can run it), "
                                      "or backend names, e.g. triton,flex (a row per named backend of each method)")
    s.add_argument("--no-baselines", action="store_true", default=None, help="do not measure SDPA/Flex baselines")
    s.add_argument("--backward", action="store_true", default=None,
                   help="time forward + backward (inputs require grad; the loss is the output's sum)")
    m = p.add_argument_group("measurement")
    m.add_argument("--device", help="cpu or cuda (default: the preset's)")
    m.add_argument("--batch", help="batch size of the synthetic workloads")
    m.add_argument("--heads", help="query heads Hq of the synthetic workloads")
    m.add_argument("--kv-heads", help="key/value heads Hkv of the synthetic workloads")
    m.add_argument("--head-dim", help="head dim D of the synthetic workloads")
    m.add_argument("--warmup", help="untimed runs before timing")
    m.add_argument("--repeats", help="timed runs per row (median, min and max are reported)")
    m.add_argument("--budget", help="seconds of timed runs per row (at least one run is always timed)")
    m.add_argument("--max-run-seconds", help="skip a row whose single run is predicted (from the same method at a "
                                             "shorter T) to take longer than this")
    m.add_argument("--max-minutes", help="stop measuring after this many minutes (remaining rows: skipped)")
    m.add_argument("--fidelity-max-t", help="compute fidelity and recall only up to this T")
    m.add_argument("--seed", help="seed of the synthetic workloads (default 0)")
    m.add_argument("--cache-dir", help="where the real workload's capture is cached (default ~/.cache/attnkit)")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="output directory (default bench_out/<preset>-<device>, which git ignores)")
    o.add_argument("--no-progress", action="store_true", default=None, help="no progress bar on stderr")
    o.add_argument("--keep-going", action="store_true", default=None,
                   help="exit 0 even when some rows failed at run time (they are recorded with their error)")


# --- parsing ----------------------------------------------------------------------------------


def parse_int(flag: str, text: str, minimum: int) -> int:
    t = text.strip().lower()
    mult = 1
    if t.endswith("k"):
        t, mult = t[:-1], 1024
    try:
        val = int(t) * mult
    except ValueError:
        raise UsageError(f"{flag}: expected an integer, got {text!r}") from None
    if val < minimum:
        raise UsageError(f"{flag}: expected an integer >= {minimum}, got {text!r}")
    return val


def _float(flag: str, text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        raise UsageError(f"{flag}: expected a number, got {text!r}") from None
    if not val > 0 or val == float("inf"):
        raise UsageError(f"{flag}: expected a positive number, got {text!r}")
    return val


def _list(flag: str, text: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UsageError(f"{flag}: expected a comma-separated list, got {text!r}")
    return items


def register_all() -> list[str]:
    """Import the registering packages; return warnings for those that failed."""
    warnings = []
    for mod in REGISTERING:
        try:
            importlib.import_module(mod)
        except Exception as e:  # a broken method package must not hide the others
            warnings.append(f"could not import {mod} ({type(e).__name__}: {e}); its methods are not benchmarked")
    return warnings


def _methods(text: Optional[str]) -> list[str]:
    from ..registry import methods

    known = [m.name for m in methods()]
    if text is None or text.strip() == "all":
        return known
    names = _list("--methods", text)
    for n in names:
        if n not in known:
            raise UsageError(f"--methods: unknown method {n!r} (registered: {', '.join(known)})")
    return list(dict.fromkeys(names))


def parse_dtypes(text: str) -> list[torch.dtype]:
    from .runner import DTYPES

    aliases = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32",
               "float64": "fp64", "double": "fp64"}
    out = []
    for d in _list("--dtype", text):
        key = aliases.get(d.lower(), d.lower())
        if key not in DTYPES:
            raise UsageError(f"--dtype: expected fp16, bf16, fp32 or fp64, got {d!r}")
        out.append(DTYPES[key])
    return list(dict.fromkeys(out))


def _overrides(items: Optional[list[str]]) -> dict[str, dict[str, Any]]:
    from ..registry import get_method

    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        target, sep, value = item.partition("=")
        method, dot, option = target.strip().partition(".")
        if not sep or not dot or not method or not option:
            raise UsageError(f"--set: expected METHOD.OPTION=VALUE, got {item!r}")
        try:
            spec = get_method(method)
        except Exception:
            raise UsageError(f"--set: unknown method {method!r} in {item!r}") from None
        fields = [f.name for f in dataclasses.fields(spec.options)]
        if option not in fields:
            raise UsageError(f"--set: {option!r} is not an option of {method!r} (its options: {', '.join(fields) or 'none'})")
        try:
            parsed: Any = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parsed = value.strip()
        out.setdefault(method, {})[option] = parsed
    return out


def _command(args: argparse.Namespace) -> str:
    """The command, rebuilt from the arguments given (so a results file says how to make it again)."""
    parts = ["attnkit", "bench"]
    for key, val in vars(args).items():
        if key in ("func", "command") or val is None or val is False:
            continue
        flag = "--import" if key == "imports" else "--" + key.replace("_", "-")
        if val is True:
            parts.append(flag)
        elif isinstance(val, list):
            parts += [x for v in val for x in (flag, v)]
        else:
            parts += [flag, str(val)]
    return " ".join(parts)


def _preset(args: argparse.Namespace) -> tuple[str, Preset]:
    chosen = [n for n, flag in (("quick", args.quick), ("gpu", args.gpu)) if flag]
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise UsageError(f"--preset: expected one of {', '.join(PRESETS)}, got {args.preset!r}")
        chosen.append(args.preset)
    if len(chosen) > 1:
        raise UsageError(f"--quick, --gpu and --preset are exclusive presets, got {' and '.join(chosen)}")
    name = chosen[0] if chosen else "quick"
    return name, PRESETS[name]


def _backends(text: str, methods: list[str], device: str) -> tuple[str, list[str]]:
    """'auto', 'all' or a comma-separated list of backend names; returns (value, methods that have one).
    Raises for a name no selected method has, or one that cannot run on the device at all."""
    from ..registry import get_method

    if text in ("auto", "all"):
        return text, methods
    names = _list("--backends", text)
    specs = [get_method(m) for m in methods]
    known = sorted({b.name for s in specs for b in s.backends})
    for n in names:
        if n in ("auto", "all"):
            raise UsageError(f"--backends: {n!r} cannot be combined with backend names, got {text!r}")
        have = [b for s in specs for b in s.backends if b.name == n]
        if not have:
            raise UsageError(f"--backends: no selected method has a backend {n!r} (their backends: {', '.join(known)})")
        if all(device not in b.devices for b in have):
            raise UsageError(f"--backends: {n!r} runs on {'/'.join(have[0].devices)}, the device is {device}")
        why = have[0].unavailable()
        if why:
            raise UsageError(f"--backends: {n!r} is not available here: {why}")
    kept = [m for m, s in zip(methods, specs) if any(b.name in names for b in s.backends)]
    return ",".join(dict.fromkeys(names)), kept


def _check_options(config: Any) -> None:
    """Every overridden method's options, parsed against a small call of the run's shape and shortest
    length, so an out-of-range value (`--set moba.topk=0`) is an argument error, not a row of errors."""
    from ..core.contract import validate_attention
    from ..registry import get_method, parse_options
    from .runner import REAL_SEQLEN

    sh = config.shape
    T = min(config.seqlens) if any(w != "real" for w in config.workloads) else REAL_SEQLEN
    for method, opts in config.overrides.items():
        if method not in config.methods:
            raise UsageError(f"--set: method {method!r} is not in this run (--methods)")
        spec = get_method(method)
        hkv = sh.heads_kv if spec.capabilities.gqa else sh.heads_q
        q = torch.randn(sh.batch, T, sh.heads_q, sh.head_dim)
        k, v = torch.randn(sh.batch, T, hkv, sh.head_dim), torch.randn(sh.batch, T, hkv, sh.head_dim)
        try:
            call = validate_attention(q, k, v, causal=True)
            options = {**spec.example(call), **opts}
            parse_options(spec, call, options)
        except Exception as e:
            items = ", ".join(f"{method}.{k}={v!r}" for k, v in opts.items())
            raise UsageError(f"--set {items}: {str(e).strip().splitlines()[0]}") from None


def build_config(args: argparse.Namespace) -> Any:
    """Arguments -> a runner Config; raises UsageError with a one-line message for a bad argument or an
    impossible combination, before any measurement."""
    from .runner import REAL_SEQLEN, Config
    from .workloads import WORKLOADS, Shape

    name, pre = _preset(args)
    device = (args.device or pre.device).strip().lower()
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected cpu or cuda, got {args.device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        why = f"--preset {name}" if pre.device == "cuda" and not args.device else "--device cuda"
        why = "--gpu" if args.gpu and not args.device else why
        raise UsageError(f"{why}: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                         "use --quick for the CPU run")
    seqlens = [parse_int("--seqlens", x, 1) for x in _list("--seqlens", args.seqlens)] if args.seqlens else list(pre.seqlens)
    if pre.study == "decode":
        return _decode_config(args, name, pre, device, seqlens)
    wl_text = args.workloads or pre.workloads
    workloads = _list("--workloads", wl_text) if wl_text else list(WORKLOADS)
    for w in workloads:
        if w not in WORKLOADS:
            raise UsageError(f"--workloads: expected some of {', '.join(WORKLOADS)}, got {w!r}")
    if set(workloads) == {"real"}:
        for flag in ("seqlens", "batch", "heads", "kv_heads", "head_dim"):
            if getattr(args, flag):
                raise UsageError(f"--{flag.replace('_', '-')}: the real workload has a fixed shape (T={REAL_SEQLEN}, "
                                 "MiniLM's heads); add --workloads random or structured to use it")
    methods = _methods(args.methods or pre.methods)
    backends, methods = _backends((args.backends or pre.backends).strip(), methods, device)
    if not methods:
        raise UsageError("--methods: no method left to measure")
    shape = Shape(
        batch=parse_int("--batch", args.batch, 1) if args.batch else pre.batch,
        heads_q=parse_int("--heads", args.heads, 1) if args.heads else pre.heads,
        heads_kv=parse_int("--kv-heads", args.kv_heads, 1) if args.kv_heads else pre.kv_heads,
        head_dim=parse_int("--head-dim", args.head_dim, 1) if args.head_dim else pre.head_dim,
    )
    if shape.heads_q % shape.heads_kv:
        raise UsageError(f"--kv-heads: expected a divisor of --heads {shape.heads_q}, got {shape.heads_kv}")
    custom = any(getattr(args, a) for a in ("seqlens", "dtype", "methods", "workloads", "backends", "set", "backward"))
    config = Config(
        preset=f"{name}+custom" if custom else name,
        device=torch.device(device),
        methods=methods,
        seqlens=list(dict.fromkeys(seqlens)),
        dtypes=parse_dtypes(args.dtype) if args.dtype else parse_dtypes(",".join(pre.dtypes)),
        workloads=list(dict.fromkeys(workloads)),
        shape=shape,
        warmup=parse_int("--warmup", args.warmup, 0) if args.warmup else pre.warmup,
        repeats=parse_int("--repeats", args.repeats, 1) if args.repeats else pre.repeats,
        budget_s=_float("--budget", args.budget) if args.budget else pre.budget,
        max_run_s=_float("--max-run-seconds", args.max_run_seconds) if args.max_run_seconds else pre.max_run,
        max_minutes=_float("--max-minutes", args.max_minutes) if args.max_minutes else pre.max_minutes,
        fidelity_max_t=parse_int("--fidelity-max-t", args.fidelity_max_t, 1) if args.fidelity_max_t else pre.fidelity_max_t,
        backends=backends,
        overrides=_overrides([*pre.overrides, *(args.set or [])]),
        baselines=not args.no_baselines,
        backward=bool(args.backward),
        seed=parse_int("--seed", args.seed, 0) if args.seed else 0,
        cache_dir=args.cache_dir,
    )
    _check_options(config)
    return config


def _decode_config(args: argparse.Namespace, name: str, pre: Preset, device: str, seqlens: list[int]) -> Any:
    """The Config of the decode study: its methods and workload are fixed, the shape and timing flags apply."""
    from .decode import BACKENDS
    from .runner import Config
    from .workloads import Shape

    for flag in ("methods", "workloads", "set", "backward", "imports", "no_baselines"):
        if getattr(args, flag, None):
            raise UsageError(f"--{flag.replace('_', '-').replace('imports', 'import')}: the {name} preset measures a "
                             "fixed set (dense and Quest decode against SDPA); it takes no such option")
    backends = (args.backends or pre.backends).strip()
    if backends not in ("all", "auto"):
        for b in _list("--backends", backends):
            if b not in BACKENDS:
                raise UsageError(f"--backends: expected 'all', 'auto' or some of {', '.join(BACKENDS)}, got {b!r}")
    shape = Shape(
        batch=parse_int("--batch", args.batch, 1) if args.batch else pre.batch,
        heads_q=parse_int("--heads", args.heads, 1) if args.heads else pre.heads,
        heads_kv=parse_int("--kv-heads", args.kv_heads, 1) if args.kv_heads else pre.kv_heads,
        head_dim=parse_int("--head-dim", args.head_dim, 1) if args.head_dim else pre.head_dim,
    )
    if shape.heads_q % shape.heads_kv:
        raise UsageError(f"--kv-heads: expected a divisor of --heads {shape.heads_q}, got {shape.heads_kv}")
    custom = any(getattr(args, a) for a in ("seqlens", "dtype", "backends"))
    return Config(
        preset=f"{name}+custom" if custom else name, device=torch.device(device), methods=["dense", "quest"],
        seqlens=list(dict.fromkeys(seqlens)),
        dtypes=parse_dtypes(args.dtype) if args.dtype else parse_dtypes(",".join(pre.dtypes)),
        workloads=["decode"], shape=shape,
        warmup=parse_int("--warmup", args.warmup, 0) if args.warmup else pre.warmup,
        repeats=parse_int("--repeats", args.repeats, 1) if args.repeats else pre.repeats,
        budget_s=_float("--budget", args.budget) if args.budget else pre.budget,
        max_minutes=_float("--max-minutes", args.max_minutes) if args.max_minutes else pre.max_minutes,
        backends=backends, seed=parse_int("--seed", args.seed, 0) if args.seed else 0, study="decode",
    )


def _out_dir(args: argparse.Namespace, config: Any) -> Path:
    out = Path(args.out) if args.out else Path("bench_out") / f"{config.preset.split('+')[0]}-{config.device.type}"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {str(out)!r} exists and is not a directory")
    return out


def _fail(msg: str) -> int:
    print(f"attnkit bench: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from . import advice, report
    from .runner import Runner

    for w in register_all():
        print(f"attnkit bench: warning: {w}", file=sys.stderr)
    try:
        for mod in getattr(args, "imports", None) or ():
            try:
                importlib.import_module(mod)
            except Exception as e:
                raise UsageError(f"--import: cannot import {mod!r} ({type(e).__name__}: {e})") from None
        config = build_config(args)
        out = _out_dir(args, config)
        out.mkdir(parents=True, exist_ok=True)
    except UsageError as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"--out: cannot create the output directory ({e})")
    command = _command(args)
    json_path = out / "bench.json"

    def checkpoint(doc: dict[str, Any]) -> None:  # partial results survive an interrupted run
        doc["command"] = command
        report.write_json(doc, json_path)

    if config.study == "decode":
        from .decode import DecodeRunner

        runner: Any = DecodeRunner(config, progress=not args.no_progress, checkpoint=checkpoint)
    else:
        runner = Runner(config, progress=not args.no_progress, checkpoint=checkpoint)
    runner.command = command  # type: ignore[attr-defined]
    print(f"attnkit bench: {runner.plan()} on {config.device.type}; results -> {out}", file=sys.stderr)
    runner.run()
    doc = runner.document(command)
    paths = report.write_reports(doc, out)
    print(report.terminal_table(doc))
    counts = {s: sum(r["status"] == s for r in doc["rows"]) for s in ("ok", "error", "skipped")}
    print(f"\n{counts['ok']} rows ok, {counts['error']} errors, {counts['skipped']} skipped. Wrote "
          + ", ".join(str(p) for p in paths.values()))
    print("\nSummary: what to use here\n" + "\n".join(advice.summary(doc)))
    if counts["error"] and not args.keep_going:
        print(f"attnkit bench: {counts['error']} rows failed at run time (their errors are in the table and in "
              f"{json_path}); exit status 1 (--keep-going: 0)", file=sys.stderr)
        return 1
    return 0
