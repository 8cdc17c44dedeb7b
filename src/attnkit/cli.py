"""The `attnkit` command line.

    attnkit list [--markdown | --json]      methods (options, backends, capabilities) and KV-cache policies
    attnkit info                            every backend, whether it is usable here, and why not
    attnkit explain METHOD [--seqlen 4K] [--set OPTION=VALUE ...]   which backend runs a call, and why
    attnkit bench [...]                     speed, memory and fidelity of every method (docs/benchmark.md)
    attnkit accuracy [...]                  long-context task accuracy on a real model (docs/accuracy.md)
    attnkit --version

A bad argument exits with status 2 and one line on stderr. Output to a closed pipe
(`attnkit list | head`) ends quietly.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
from typing import Any, Optional, Sequence


def _kv_policies() -> list[dict[str, Any]]:
    """One row per KV-cache policy: eviction policies (what the cache keeps) and sparse readers (what a
    decode step reads), each with its kind, summary and options (`attnkit.hf.kv_policy(model, name, ...)`)."""
    from .kv import POLICIES, sparse

    readers = {c.name: c for c in (sparse.Quest, sparse.Recycled, sparse.Santa, sparse.Routed)}
    rows = []
    for kind, classes in (("eviction", POLICIES), ("reader", readers)):
        for name, cls in classes.items():
            doc = (cls.__doc__ or "").strip().split("\n\n")[0]
            rows.append({"name": name, "kind": kind, "summary": " ".join(doc.split()),
                         "options": [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]})
    return rows


def _list(args: argparse.Namespace) -> int:
    from . import registry

    if args.markdown:
        print(registry.markdown_table())
    elif args.json:
        print(json.dumps({"methods": registry.list_methods(), "kv_policies": _kv_policies()}, indent=2))
    else:
        rows = registry.list_methods()
        width = max(len(r["name"]) for r in rows)
        print("Methods (attnkit.attention(q, k, v, method=NAME, **options)):")
        for r in rows:
            caps = ",".join(k for k, v in r["capabilities"].items() if v)
            print(f"  {r['name']:<{width}}  {r['family']:<8} [{', '.join(r['backends'])}]  {caps}")
            print(f"  {'':<{width}}  options: {', '.join(r['options']) or 'none'}")
            print(f"  {'':<{width}}  {r['paper']}")
        print("\nKV-cache policies (attnkit.kv; attnkit.hf.kv_policy(model, NAME, **options)):")
        pols = _kv_policies()
        pw = max(len(p["name"]) for p in pols)
        for p in pols:
            print(f"  {p['name']:<{pw}}  {p['kind']:<8} options: {', '.join(p['options'])}")
            print(f"  {'':<{pw}}  {p['summary']}")
    return 0


def _info(args: argparse.Namespace) -> int:
    """Every declared backend (of each method and each op), whether it can run on this machine, and
    why not; `attnkit.explain` answers for a given call."""
    import torch

    from . import config, ops, registry
    from .ops.dispatch import DTYPE_NAMES

    here = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"devices here: {', '.join(here)}; torch {torch.__version__}")
    print(f"settings: {config.get()}")
    owners = [(f"method {s.name}", s.backends) for s in registry.methods()]
    owners += [(f"ops.{name}", mod.DECLARED) for name, mod in
               (("decode_attention", ops.decode), ("dense_attention", ops.dense), ("masked_attention", ops.masked),
                ("sparse_attention", ops.sparse))]
    from .distributed import blocks
    from .linear import dispatch as linear_dispatch

    owners += [("linear.* (direct calls)", linear_dispatch.DECLARED), ("distributed ring blocks", blocks.DECLARED)]
    for owner, backends in owners:
        print(owner)
        for b in backends:
            reason = b.unavailable()
            devices = [d for d in b.devices if d in here]
            usable = reason is None and bool(devices)
            why = reason or ("" if devices else f"needs {'/'.join(b.devices)}")
            traits = (f"{'/'.join(b.devices)}; {','.join(DTYPE_NAMES.get(d, str(d)) for d in b.dtypes)}"
                      f"{'; lse' if b.lse else ''}{'; varlen' if b.varlen else ''}{'; backward' if b.backward else ''}"
                      f"{f'; head dim <= {b.max_head_dim}' if b.max_head_dim else ''}"
                      f"{'; needs ' + ','.join(b.requires) if b.requires else ''}"
                      f"{'; off unless ' + b.disabled_by if b.disabled_by else ''}")
            print(f"  {'yes' if usable else 'no ':<3} {b.name:<12} {traits}{'  -- ' + why if why else ''}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    """Build random inputs of the given shape and print the dispatcher's verdict for each backend."""
    import torch

    import attnkit as ak

    from .bench.cli import UsageError, parse_dtypes, parse_int, register_all

    register_all()
    try:
        T = parse_int("--seqlen", args.seqlen, 1)
        tq = parse_int("--q-len", args.q_len, 1) if args.q_len else T
        B, H = parse_int("--batch", args.batch, 1), parse_int("--heads", args.heads, 1)
        hkv, D = parse_int("--kv-heads", args.kv_heads, 1) if args.kv_heads else H, parse_int("--head-dim", args.head_dim, 1)
        dtype = parse_dtypes(args.dtype)[0]
        device = args.device.strip().lower()
        if device not in ("cpu", "cuda"):
            raise UsageError(f"--device: expected cpu or cuda, got {args.device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is available here")
        options: dict[str, Any] = {}
        for item in args.set or []:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise UsageError(f"--set: expected OPTION=VALUE, got {item!r}")
            try:
                options[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                options[key.strip()] = value.strip()
        spec = ak.registry.get_method(args.method)
        meta = torch.device(device)
        q = torch.randn(B, tq, H, D, dtype=dtype, device=meta)
        k, v = (torch.randn(B, T, hkv, D, dtype=dtype, device=meta) for _ in range(2))
        call = ak.core.contract.validate_attention(q, k, v, causal=not args.non_causal)
        given = dict(options)
        options = {**spec.example(call), **options}
        exp = ak.explain(q, k, v, method=args.method, causal=not args.non_causal, backend=args.backend,
                         return_lse=args.return_lse, **options)
    except (UsageError, ak.AttnkitError) as e:
        print(f"attnkit explain: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    shown = ", ".join(f"{k}={'Tensor' + str(tuple(v.shape)) if isinstance(v, torch.Tensor) else v!r}"
                      for k, v in options.items())
    print(f"q [{B}, {tq}, {H}, {D}], k/v [{B}, {T}, {hkv}, {D}], {args.dtype}, {device}, "
          f"causal={not args.non_causal}; options: {shown or 'none'}"
          + (" (unset options: the method's example values)" if set(options) - set(given) else ""))
    print(exp)
    return 0 if exp.chosen else 1


def _version() -> str:
    from . import __version__

    return f"attnkit {__version__}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnkit", description="Efficient attention for long-context transformers.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list the methods (options, backends, capabilities) and the KV-cache policies")
    fmt = p_list.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="print the README's capability table")
    fmt.add_argument("--json", action="store_true", help="print methods and KV policies as JSON")
    p_list.set_defaults(func=_list)
    p_info = sub.add_parser("info", help="print every backend, whether it is usable here, and why not")
    p_info.set_defaults(func=_info)
    p_exp = sub.add_parser("explain", help="which backend would run a call, and why not the others")
    p_exp.add_argument("method", help="a registered method (attnkit list)")
    p_exp.add_argument("--seqlen", default="4096", help="key length T (default 4096; K = 1024)")
    p_exp.add_argument("--q-len", help="query length (default: T; 1 for a decoding step)")
    p_exp.add_argument("--batch", default="1")
    p_exp.add_argument("--heads", default="8", help="query heads")
    p_exp.add_argument("--kv-heads", help="key/value heads (default: --heads)")
    p_exp.add_argument("--head-dim", default="64")
    p_exp.add_argument("--dtype", default="fp32", help="fp16, bf16, fp32 or fp64")
    p_exp.add_argument("--device", default="cpu", help="cpu or cuda")
    p_exp.add_argument("--backend", default="auto", help="request a backend (default auto)")
    p_exp.add_argument("--non-causal", action="store_true")
    p_exp.add_argument("--return-lse", action="store_true")
    p_exp.add_argument("--set", action="append", metavar="OPTION=VALUE", help="a method option (repeatable)")
    p_exp.set_defaults(func=_explain)
    p_bench = sub.add_parser("bench", help="measure speed, memory and fidelity of every method; say which to use")
    from .bench.cli import add_arguments, run

    add_arguments(p_bench)
    p_bench.set_defaults(func=run)
    p_acc = sub.add_parser("accuracy", help="long-context task accuracy of dense, sparse prefill and KV policies on a "
                                            "real model (docs/accuracy.md)")
    from .bench.accuracy import cli as accuracy_cli

    accuracy_cli.add_arguments(p_acc)
    p_acc.set_defaults(func=accuracy_cli.run)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader closed the pipe (`attnkit list | head`): stop quietly; point stdout at devnull so
        # the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
