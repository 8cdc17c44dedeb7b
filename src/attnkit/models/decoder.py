"""`DecoderLM`: a Llama-style reference decoder built from attnkit's layers.

    tokens -> embedding -> N x [x + mixer(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> lm_head

The mixer of each block is an `Attention` (any softmax-family method) or a `LinearAttention`
(hybrid stacks). Small enough to train on one GPU in minutes; the quality benchmarks train it
with each method.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.contract import AttnkitError
from ..layers import Cache, RMSNorm, make_mixer
from ..layers.cache import LayerCache
from ..layers.rope import RoPE
from .config import DecoderConfig
from .generation import generate
from .io import load_pretrained, save_pretrained


class SwiGLU(nn.Module):
    """`W2 (silu(x W1) * x W3)` (Shazeer, "GLU Variants Improve Transformer")."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, inner, bias=False)
        self.w3 = nn.Linear(hidden, inner, bias=False)
        self.w2 = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """A pre-norm decoder block."""

    def __init__(self, cfg: DecoderConfig, method: str, layer_idx: int) -> None:
        super().__init__()
        self.method = method
        attn_kw = {"rope": RoPE(cfg.rope_theta, cfg.rope_fraction), "output_gate": cfg.output_gate,
                   "head_dim": cfg.head_dim, **cfg.attention}
        lin_kw = {"head_dim": cfg.head_dim, **cfg.linear}
        if method == "lightning_attention":
            lin_kw.setdefault("num_layers", cfg.num_layers)
        self.mixer_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mixer = make_mixer(method, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, layer_idx=layer_idx,
                                attention_kwargs=attn_kw, linear_kwargs=lin_kw,
                                method_options=cfg.method_options.get(method, {}))
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.ffn_size)

    def forward(self, x: torch.Tensor, cache: Optional[LayerCache], cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), cache=cache, cu_seqlens=cu_seqlens)
        return x + self.mlp(self.mlp_norm(x))


class DecoderLM(nn.Module):
    """The reference decoder LM. `forward(input_ids [B, T]) -> logits [B, T, V]` (and the mean
    next-token loss when `labels` are given, with -100 ignored)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        if not isinstance(config, DecoderConfig):
            raise AttnkitError(f"config: expected a DecoderConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, m, i) for i, m in enumerate(config.layer_methods()))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init(self, m: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def new_cache(self) -> Cache:
        """An empty decoding cache with one entry per block."""
        return Cache(len(self.blocks))

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        cache: Optional[Cache] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
    ) -> Any:
        """`input_ids: [B, T]` int64. Returns logits `[B, T, V]`, or `(logits, loss)` with labels
        (next-token cross-entropy plus `aux_loss_weight` times the mixers' auxiliary losses).
        With `cache`, the tokens continue the cached ones."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            got = (tuple(input_ids.shape), input_ids.dtype) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise AttnkitError(f"input_ids: expected an int tensor [B, T], got {got}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise AttnkitError(f"input_ids: expected token ids in [0, {self.config.vocab_size}), "
                               f"got range [{int(input_ids.min())}, {int(input_ids.max())}]")
        if cache is not None and len(cache) != len(self.blocks):
            raise AttnkitError(f"cache: expected {len(self.blocks)} layers, got {len(cache)}")
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, cache[i] if cache is not None else None, cu_seqlens)
        logits = self.lm_head(self.norm(x))
        if labels is None:
            return logits
        if labels.shape != input_ids.shape:
            raise AttnkitError(f"labels: expected shape {tuple(input_ids.shape)} (same as input_ids), got {tuple(labels.shape)}")
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
        for block in self.blocks:  # auxiliary losses of the mixers (DSA's indexer loss)
            aux = getattr(block.mixer, "aux_loss", None)
            if aux is not None:
                loss = loss + self.config.aux_loss_weight * aux.float()
        return logits, loss

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def can_decode(self) -> bool:
        """Whether every mixer supports incremental decoding with a cache."""
        return all(getattr(b.mixer, "spec", None) is None or b.mixer.spec.capabilities.decode for b in self.blocks)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Continue `input_ids [B, T]` by `max_new_tokens` (see `attnkit.models.generation.generate`)."""
        return generate(self, input_ids, max_new_tokens, **kwargs)

    def save_pretrained(self, path: str) -> None:
        """Write `config.json` and `model.safetensors` to the directory `path`."""
        save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu") -> "DecoderLM":
        """Load a model written by `save_pretrained`."""
        return load_pretrained(cls, path, device)
