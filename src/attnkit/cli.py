"""The `attnkit` command line: `attnkit list [--markdown | --json]`, `attnkit bench [...]`."""

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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="attnkit", description="Efficient attention for long-context transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list registered methods and their capabilities")
    fmt = p_list.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="print the README's capability table")
    fmt.add_argument("--json", action="store_true", help="print the rows as JSON")
    p_list.set_defaults(func=_list)
    p_bench = sub.add_parser("bench", help="measure speed, memory and fidelity of every method")
    from .bench.cli import add_arguments, run

    add_arguments(p_bench)
    p_bench.set_defaults(func=run)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
