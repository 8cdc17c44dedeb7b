"""The `attnkit` command line: `attnkit list [--markdown | --json]`, `attnkit info`, `attnkit bench [...]`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def _list(args: argparse.Namespace) -> int:
    from . import registry

    if args.markdown:
        print(registry.markdown_table())
    elif args.json:
        print(json.dumps(registry.list_methods(), indent=2))
    else:
        rows = registry.list_methods()
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            caps = ",".join(k for k, v in r["capabilities"].items() if v)
            print(f"{r['name']:<{width}}  {r['family']:<8} tier {r['tier']}  [{', '.join(r['backends'])}]  {caps}")
            print(f"{'':<{width}}  {r['paper']}")
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
    for owner, backends in owners:
        print(owner)
        for b in backends:
            reason = b.available() if b.available is not None else None
            devices = [d for d in b.devices if d in here]
            usable = reason is None and bool(devices)
            why = reason or ("" if devices else f"needs {'/'.join(b.devices)}")
            traits = (f"{'/'.join(b.devices)}; {','.join(DTYPE_NAMES.get(d, str(d)) for d in b.dtypes)}"
                      f"{'; lse' if b.lse else ''}{'; varlen' if b.varlen else ''}{'; backward' if b.backward else ''}")
            print(f"  {'yes' if usable else 'no ':<3} {b.name:<12} {traits}{'  -- ' + why if why else ''}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="attnkit", description="Efficient attention for long-context transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list registered methods and their capabilities")
    fmt = p_list.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="print the README's capability table")
    fmt.add_argument("--json", action="store_true", help="print the rows as JSON")
    p_list.set_defaults(func=_list)
    p_info = sub.add_parser("info", help="print every backend, whether it is usable here, and why not")
    p_info.set_defaults(func=_info)
    p_bench = sub.add_parser("bench", help="measure speed, memory and fidelity of every method")
    from .bench.cli import add_arguments, run

    add_arguments(p_bench)
    p_bench.set_defaults(func=run)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
