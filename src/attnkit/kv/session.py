"""`KVSession`: prefill and decode of a model's attention layers against a `KVCache`, with an
eviction policy and/or a sparse-decode reader. The Hugging Face integration and the tests drive
it; it is also the plain-tensor API:

    s = KVSession(get_policy("snapkv", budget=0.25))
    out = s.prefill(layer, q, k, v)        # [B, T, Hq, Dv]; then the cache is compressed
    out = s.step(layer, q1, k1, v1)        # one decode step: append, evict, attend
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..core.contract import AttnkitError, validate_attention
from ..ops.decode import decode_attention, query_positions
from ..ops.dense import dense_attention
from .cache import KVCache
from .paged import PagedLayerCache
from .policies import EvictionPolicy, ScoreInputs


class KVSession:
    """Holds a `KVCache` plus the policy (evicts) and the reader (chooses what decode reads)."""

    def __init__(self, policy: Optional[EvictionPolicy] = None, reader: Any = None, *, page_size: int = 16,
                 backend: str = "auto", num_layers: Optional[int] = None) -> None:
        if policy is not None and not isinstance(policy, EvictionPolicy):
            raise AttnkitError(f"policy: expected an attnkit.kv EvictionPolicy or None, got {type(policy).__name__}")
        self.policy, self.reader, self.backend = policy, reader, backend
        self.cache = KVCache(num_layers, page_size=page_size)

    def inputs(self, layer: int, q: Optional[torch.Tensor], scale: float) -> ScoreInputs:
        c = self.cache.layer(layer)
        q_pos = query_positions(c, q.shape[1]) if q is not None else None
        return ScoreInputs(layer, c, c.kept(), q, q_pos, scale)

    # --- prefill --------------------------------------------------------------------------------

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: Optional[float] = None) -> torch.Tensor:
        """Causal attention of a prompt `q [B, T, Hq, D]` over itself, then cache `k`, `v` and
        compress with the policy. Returns `out [B, T, Hq, Dv]`."""
        call = validate_attention(q, k, v, causal=True, scale=scale)
        if self.cache.has_layer(layer) and int(self.cache.layer(layer).seen.max()) > 0:
            raise AttnkitError(f"layer: layer {layer} already holds tokens; prefill starts an empty cache")
        out = dense_attention(q, k, v, causal=True, scale=call.scale)
        self.cache.append(layer, k, v)
        self.compress(layer, q, call.scale)
        return out

    def compress(self, layer: int, q: torch.Tensor, scale: float) -> None:
        """Apply the policy to `layer` after its prompt `q [B, T, Hq, D]` (the newest T tokens) attended,
        then compact the layer so that the pool holds only the pages the kept tokens need."""
        if self.policy is not None:
            self.policy.compress(self.inputs(layer, q, scale))
        self.cache.layer(layer).compact()

    # --- decode ---------------------------------------------------------------------------------

    def step(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             scale: Optional[float] = None) -> torch.Tensor:
        """One decode step of `Tq` (1 to a few) new tokens: append, evict, attend. `[B, Tq, Hq, Dv]`.
        Everything is validated before the cache changes, so a rejected call can be retried."""
        validate_attention(q, k, v, causal=True, scale=scale)
        self.cache.append(layer, k, v)  # checks k, v against the cache before writing
        return self.attend(layer, q, scale)

    def attend(self, layer: int, q: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
        """Decode attention of `q` over `layer` whose new tokens were already appended."""
        c: PagedLayerCache = self.cache.layer(layer)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if self.policy is not None and self.policy.evicts_on_decode:
            self.policy.step(self.inputs(layer, q, scale))
        if self.reader is not None:
            out = self.reader.attend(q, c, scale=scale, backend=self.backend)
        else:
            out = decode_attention(q, c, scale=scale, backend=self.backend)
        if self.policy is not None:
            self.policy.observe(self.inputs(layer, q, scale))
        return out

    def memory(self) -> dict[str, int]:
        return self.cache.memory()
