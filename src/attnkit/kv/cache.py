"""`KVCache`: the KV cache of a whole model, one `PagedLayerCache` per attention layer.

Layers are created on first use (their head count and head dim come from the first append), so
a model whose layers differ (GQA ratio, head dim) is served by one object. Memory accounting
sums the layers.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from ..core.contract import AttnkitError
from .paged import PagedLayerCache


class KVCache:
    """Per layer, per KV head keys/values with original positions (see `PagedLayerCache`)."""

    def __init__(self, num_layers: Optional[int] = None, *, page_size: int = 16) -> None:
        if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)
                                       or num_layers < 1):
            raise AttnkitError(f"num_layers: expected an int >= 1 or None, got {num_layers!r}")
        self.num_layers = num_layers
        self.page_size = page_size
        self.layers: dict[int, PagedLayerCache] = {}

    def _check_index(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0 or (
                self.num_layers is not None and layer >= self.num_layers):
            raise AttnkitError(f"layer: expected an int in [0, {self.num_layers}), got {layer!r}")

    def layer(self, layer: int) -> PagedLayerCache:
        self._check_index(layer)
        if layer not in self.layers:
            raise AttnkitError(f"layer: layer {layer} has no cache yet (append to it first)")
        return self.layers[layer]

    def has_layer(self, layer: int) -> bool:
        return layer in self.layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: Optional[torch.Tensor] = None
               ) -> PagedLayerCache:
        """Append `k [B, Tn, Hkv, D]`, `v [B, Tn, Hkv, Dv]` to `layer` (created on first use)."""
        self._check_index(layer)
        if layer not in self.layers:
            if not isinstance(k, torch.Tensor) or k.dim() != 4:
                raise AttnkitError(f"k: expected a tensor [B, Tn, Hkv, D], got {getattr(k, 'shape', type(k))}")
            B, Tn, H, D = k.shape
            self.layers[layer] = PagedLayerCache(B, H, D, v.shape[-1], page_size=self.page_size, dtype=k.dtype,
                                                 device=k.device, capacity_tokens=Tn)
        self.layers[layer].append(k, v, positions)
        return self.layers[layer]

    def __iter__(self) -> Iterator[tuple[int, PagedLayerCache]]:
        return iter(sorted(self.layers.items()))

    def __len__(self) -> int:
        return len(self.layers)

    def num_kept(self) -> dict[int, torch.Tensor]:
        """Kept tokens per layer: `{layer: [B, Hkv]}`."""
        return {i: c.num_kept() for i, c in self}

    def memory(self) -> dict[str, int]:
        """Bytes summed over layers (`kept`, `pages`, `metadata`, `reserved`; see `PagedLayerCache.memory`)."""
        total = {"kept": 0, "pages": 0, "metadata": 0, "reserved": 0}
        for _, c in self:
            for key, val in c.memory().items():
                total[key] += val
        return total

    def nbytes(self) -> int:
        """Bytes of the keys and values kept (the number a KV policy shrinks)."""
        return self.memory()["kept"]
