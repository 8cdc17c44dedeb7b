"""Decode benchmark for issue 8: KV-cache read bandwidth, Quest speed-up, and policy fidelity.

One GPU run reproduces the targets (H100, bf16, B=8, Hq=32, Hkv=8, D=128, T=32K and 128K):
  1. cuDNN SDPA decode of one token over a contiguous cache: time and bandwidth on the bytes read
     (K + V of the whole cache) - the baseline;
  2. attnkit's Triton split-K decode over the paged cache, dense: bandwidth on the same bytes
     (target: >= 80 % of cuDNN's);
  3. Quest reading 1/8 of the pages, selection included (page bounds, scores, top-k, kernel):
     speed-up over dense decode (target: >= 5x at 128K) and bandwidth on the bytes it reads;
  4. (--fidelity) memory kept vs decode time vs next-token fidelity per policy and budget, on a
     Hugging Face model (`--model`, a path or hub id available locally), teacher-forced on the
     full-cache greedy continuation: KL(full || policy) and top-1 agreement per step.

    python benchmarks/decode_bench.py --out results/decode_h100.json            # 1-3 on the GPU
    python benchmarks/decode_bench.py --fidelity --model <path> --out ...       # plus 4
    TRITON_INTERPRET=1 python benchmarks/decode_bench.py --smoke                # CPU smoke run

Writes JSON (device, versions, command, rows) and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]


# --- timing --------------------------------------------------------------------------------------


def time_fn(fn: Callable[[], Any], warmup: int, reps: int) -> float:
    """Median seconds per call: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[Callable[[], Any], str]:
    """A one-token SDPA call over `[B, H, T, D]` tensors on the fastest backend that accepts it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = q.shape[1] != k.shape[1]
    candidates = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                  ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)]
    for name, be in candidates:
        def call(be=be):
            with sdpa_kernel([be]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        try:
            call()
            return call, name
        except RuntimeError:
            continue
    raise RuntimeError("no SDPA backend accepted the decode call")


# --- 1-3: bandwidth and Quest --------------------------------------------------------------------


def bench_kernels(args: argparse.Namespace) -> list[dict[str, Any]]:
    from attnkit.kv.paged import PagedLayerCache
    from attnkit.kv.sparse import Quest
    from attnkit.ops.decode import decode_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton_ok = device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    dtype = getattr(torch, args.dtype)
    B, Hq, H, D, ps = args.batch, args.hq, args.hkv, args.head_dim, args.page_size
    el = torch.empty((), dtype=dtype).element_size()
    rows = []
    for T in args.seqlens:
        torch.manual_seed(0)
        k = torch.randn(B, T, H, D, device=device, dtype=dtype)
        v = torch.randn(B, T, H, D, device=device, dtype=dtype)
        q = torch.randn(B, 1, Hq, D, device=device, dtype=dtype)
        cache_bytes = 2 * B * T * H * D * el
        base = dict(T=T, B=B, Hq=Hq, Hkv=H, D=D, dtype=args.dtype, page_size=ps)

        fn, be = sdpa_decode(q.transpose(1, 2), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
        t_sdpa = time_fn(fn, args.warmup, args.reps)
        rows.append(dict(base, impl=f"sdpa-{be}", seconds=t_sdpa, bytes_read=cache_bytes,
                         tb_per_s=cache_bytes / t_sdpa / 1e12))

        cache = PagedLayerCache(B, H, D, page_size=ps, dtype=dtype, device=device, capacity_tokens=T)
        cache.append(k, v)
        del k, v
        if device == "cuda":
            torch.cuda.empty_cache()
        if not triton_ok:
            rows.append(dict(base, impl="triton-dense", skipped="no CUDA and TRITON_INTERPRET != 1"))
            continue
        from attnkit.kernels.decode import paged_decode

        scale = D ** -0.5
        t_dense = time_fn(lambda: paged_decode(q, cache, None, scale=scale), args.warmup, args.reps)
        rows.append(dict(base, impl="triton-dense", seconds=t_dense, bytes_read=cache_bytes,
                         tb_per_s=cache_bytes / t_dense / 1e12, vs_sdpa_bandwidth=t_sdpa / t_dense))
        t_op = time_fn(lambda: decode_attention(q, cache, backend="triton"), args.warmup, args.reps)
        rows.append(dict(base, impl="decode_attention(triton, dense)", seconds=t_op, bytes_read=cache_bytes,
                         tb_per_s=cache_bytes / t_op / 1e12))

        pages = math.ceil(T / ps)
        quest = Quest(topk=max(1, pages // args.quest_fraction))
        cache.page_bounds()  # bounds are built once when the prompt is cached; decode steps update one page

        def quest_step() -> Any:
            sel = quest.select(q, cache, scale)
            return paged_decode(q, cache, sel, scale=scale)

        t_quest = time_fn(quest_step, args.warmup, args.reps)
        t_sel = time_fn(lambda: quest.select(q, cache, scale), args.warmup, args.reps)
        read = 2 * B * H * quest.topk * ps * D * el
        rows.append(dict(base, impl=f"triton-quest-1/{args.quest_fraction}", topk_pages=quest.topk,
                         seconds=t_quest, selection_seconds=t_sel, bytes_read=read,
                         tb_per_s=read / (t_quest - t_sel) / 1e12 if t_quest > t_sel else None,
                         speedup_vs_dense=t_dense / t_quest))
        del cache
        if device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(rows[-4:], default=str), flush=True)
    return rows


# --- 4: fidelity of the next-token distribution --------------------------------------------------


POLICY_GRID = [
    ("full", {}),
    ("streaming", {"sinks": 4, "budget": 0.25}), ("streaming", {"sinks": 4, "budget": 0.125}),
    ("h2o", {"budget": 0.25}), ("h2o", {"budget": 0.125}),
    ("snapkv", {"budget": 0.25, "obs_window": 32}), ("snapkv", {"budget": 0.125, "obs_window": 32}),
    ("razor", {"sinks": 4, "budget": 0.125}),
    ("quest", {"topk": 8}), ("recycled", {"stride": 4, "topk": 256}), ("santa", {"samples": 256}),
]


@torch.no_grad()
def bench_fidelity(args: argparse.Namespace) -> list[dict[str, Any]]:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from attnkit.integrations.hf_kv import kv_policy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype)).to(device)
        source = args.model
    else:  # no weights: a random tiny Llama, which exercises the code but says nothing about quality
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(device)
        source = "random tiny Llama (no --model given): code path only, not a quality number"
    model.eval()
    vocab = model.config.get_text_config(decoder=True).vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=g).to(device)
    mask = torch.ones_like(prompt)
    ref = model.generate(prompt, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref_logp = torch.log_softmax(torch.stack(ref.logits, 1).float(), -1)  # [1, new, V]
    cont = ref.sequences[:, prompt.shape[1]:]
    rows = []
    for name, opts in POLICY_GRID:
        def run() -> tuple[torch.Tensor, float]:
            out = model(prompt, attention_mask=mask, use_cache=True)
            pkv = out.past_key_values
            logits = [out.logits[:, -1]]
            t0 = time.perf_counter()
            for i in range(cont.shape[1] - 1):
                step = model(cont[:, i:i + 1], past_key_values=pkv, use_cache=True)
                logits.append(step.logits[:, -1])
            if device == "cuda":
                torch.cuda.synchronize()
            per_tok = (time.perf_counter() - t0) / max(1, cont.shape[1] - 1)
            return torch.stack(logits, 1), per_tok

        if name == "full":  # plain transformers DynamicCache: its keys + values after the same tokens
            logits, per_tok = run()
            out = model(torch.cat([prompt, cont[:, :-1]], 1), use_cache=True)
            kept = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in out.past_key_values.layers)
        else:
            with kv_policy(model, name, **opts) as kv:
                logits, per_tok = run()
                kept = kv.memory()["kept"]
        logp = torch.log_softmax(logits.float(), -1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # [1, new]
        top1 = (logp.argmax(-1) == ref_logp.argmax(-1)).float().mean().item()
        rows.append(dict(policy=name, options=opts, model=source, prompt_len=args.prompt_len,
                         new_tokens=args.new_tokens, kept_bytes=kept, decode_seconds_per_token=per_tok,
                         kl_mean=kl.mean().item(), kl_max=kl.max().item(), top1_agreement=top1))
        print(json.dumps(rows[-1], default=str), flush=True)
    return rows


# --- output ----------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "command": " ".join([sys.executable] + sys.argv)}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip()
    except OSError:
        info["commit"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["device"] = "cpu"
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--quest-fraction", type=int, default=8, help="Quest reads 1/N of the pages")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--fidelity", action="store_true", help="also run the policy fidelity grid (section 4)")
    p.add_argument("--model", default=None, help="HF model path / hub id for --fidelity")
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--smoke", action="store_true", help="tiny CPU-sized run to check the script")
    p.add_argument("--out", default=str(ROOT / "results" / "decode_bench.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.seqlens, args.batch, args.hq, args.hkv, args.head_dim = [256], 1, 4, 2, 32
        args.warmup, args.reps, args.prompt_len, args.new_tokens = 1, 2, 320, 4
        args.fidelity = True
    if not torch.cuda.is_available() and not args.smoke:
        print("warning: no CUDA device; the targets are GPU numbers (use --smoke to check the script)", flush=True)
    result = {"environment": environment(), "kernels": bench_kernels(args)}
    if args.fidelity:
        result["fidelity"] = bench_fidelity(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    md = "\n\n".join(f"## {k}\n\n{markdown(v)}" for k, v in result.items() if isinstance(v, list))
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
