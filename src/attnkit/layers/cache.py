"""A plain decoding cache for the layers: keys and values (attention), or a recurrent state
(linear attention), per layer. No eviction: this is the exact cache that the KV-cache policies
of `attnkit.kv` compress.

Tensors are sequence-first, as everywhere in attnkit: `k: [B, T, Hkv, D]`, `v: [B, T, Hkv, Dv]`.
Key-side method inputs (e.g. DSA's indexer keys `k_idx: [B, T, Di]`) are cached next to the keys,
because a decoding query scores every key present.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..core.contract import AttnkitError


def _cat(old: Optional[torch.Tensor], new: torch.Tensor, name: str) -> torch.Tensor:
    if old is None:
        return new
    if old.shape[0] != new.shape[0] or old.shape[2:] != new.shape[2:]:
        raise AttnkitError(f"cache: cached {name} has shape {tuple(old.shape)}, new entries {tuple(new.shape)} do not extend it")
    return torch.cat([old, new], dim=1)


@dataclass
class LayerCache:
    """One layer's state between calls. `seen` counts the tokens the layer has processed (the
    position of the next token)."""

    k: Optional[torch.Tensor] = None  # [B, T, Hkv, D]
    v: Optional[torch.Tensor] = None  # [B, T, Hkv, Dv]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # key-side inputs [B, T, ...]
    state: Optional[torch.Tensor] = None  # linear-family state [B, H, K, V] float32
    conv: dict[str, torch.Tensor] = field(default_factory=dict)  # short-conv tails [B, W - 1, C]
    seen: int = 0

    def append(
        self, k: torch.Tensor, v: torch.Tensor, extras: Optional[dict[str, torch.Tensor]] = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Append new keys/values (and key-side extras) `[B, t, ...]`; return the full cache."""
        extras = extras or {}
        if self.k is not None and set(extras) != set(self.extras):
            raise AttnkitError(f"cache: extras {sorted(extras)} differ from cached {sorted(self.extras)}")
        self.k, self.v = _cat(self.k, k, "k"), _cat(self.v, v, "v")
        self.extras = {name: _cat(self.extras.get(name), t, name) for name, t in extras.items()}
        self.seen += k.shape[1]
        return self.k, self.v, self.extras

    @property
    def batch_size(self) -> Optional[int]:
        for t in (self.k, self.state):
            if t is not None:
                return t.shape[0]
        return None


class Cache:
    """The decoding cache of a stack: one `LayerCache` per layer."""

    def __init__(self, num_layers: int) -> None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise AttnkitError(f"num_layers: expected an int >= 1, got {num_layers!r}")
        self.layers = [LayerCache() for _ in range(num_layers)]

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def seen(self) -> int:
        """Tokens processed so far (the position of the next token)."""
        return self.layers[0].seen
