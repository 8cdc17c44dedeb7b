"""`attnkit accuracy`: long-context task accuracy of dense, sparse prefill and KV-cache configurations.

    attnkit accuracy --quick                       # 2-core CPU, under 10 minutes
    attnkit accuracy --full                        # one GPU: every configuration, lengths 1K-8K
    attnkit accuracy --configs snapkv@0.25,moba --lengths 2K,4K --samples 3 --out results/mine

Writes accuracy.json (benchmark schema, rows with an `accuracy` field), accuracy.md and
accuracy.png to --out after every configuration; running the same command again resumes.
Bad arguments exit with status 2 and a one-line message. See docs/accuracy.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from ...core.contract import OptionError


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="CPU, fp32, T=1K,2K, one sample per task, five configurations "
                                                        "at 25 %% (the default)")
    g.add_argument("--full", action="store_true", help="CUDA, bf16, T=1K..8K, every applicable configuration at "
                                                       "12.5/25/50 %% (vertical_slash, hip: 12.5/25 %%; xattention, "
                                                       "flexprefill, token_sparse: their papers' thresholds), rounds "
                                                       "of samples until --max-minutes")
    p.add_argument("--configs", help="comma-separated: NAME (every budget) or NAME@BUDGET, or a group (prefill, "
                                     "estimated, kv-eviction, kv-reader), e.g. sliding_window@0.25,snapkv,power,"
                                     "estimated@0.25 (dense always runs)")
    p.add_argument("--tasks", help="comma-separated task names (default: all five)")
    p.add_argument("--lengths", help="comma-separated prompt lengths in tokens, e.g. 1K,4K")
    p.add_argument("--samples", type=int, help="samples per task and length")
    p.add_argument("--seed", type=int, default=0, help="seed of the task generators (default 0)")
    p.add_argument("--model", help="a transformers causal LM directory (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--gguf-file", help="a GGUF file inside --model")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--max-minutes", type=float, help="start no new configuration after this many minutes")
    p.add_argument("--out", help="output directory (default results/accuracy-<profile>)")
    p.add_argument("--fresh", action="store_true", help="discard an existing results file in --out instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress on stderr")


def _length(text: str) -> int:
    t = text.strip().lower()
    mult = 1024 if t.endswith("k") else 1
    try:
        return int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise OptionError(f"lengths: expected integers such as 2048 or 2K, got {text!r}") from None


def settings_from(args: argparse.Namespace):
    from .configs import PROFILES, parse_configs, replace
    from .run import Settings
    from .tasks import TASKS

    name = "full" if args.full else "quick"
    prof = replace(PROFILES[name],
                   lengths=tuple(_length(x) for x in args.lengths.split(",")) if args.lengths else None,
                   samples=args.samples, device=args.device, dtype=args.dtype, max_minutes=args.max_minutes,
                   configs=tuple(x for x in args.configs.split(",") if x.strip()) if args.configs else None)
    return Settings(lengths=prof.lengths, configs=parse_configs(list(prof.configs)), samples=prof.samples,
                    tasks=tuple(x.strip() for x in args.tasks.split(",")) if args.tasks else tuple(TASKS),
                    seed=args.seed, device=prof.device, dtype=prof.dtype, model=args.model, gguf_file=args.gguf_file,
                    max_minutes=prof.max_minutes, out=args.out or f"results/accuracy-{name}", fresh=args.fresh,
                    progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    import torch

    from .run import run as run_suite
    from .report import summary

    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        settings = settings_from(args)
        settings.check()
        doc = run_suite(settings)
    except OptionError as e:
        print(f"attnkit accuracy: {e}", file=sys.stderr)
        return 2
    for line in summary(doc):
        print(line)
    print(f"wrote {settings.out}/accuracy.json, accuracy.md, accuracy.png")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="attnkit accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))
