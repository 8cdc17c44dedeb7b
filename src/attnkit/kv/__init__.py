"""KV cache, eviction policies and sparse decoding.

See docs/kv_cache.md and docs/mechanisms.md, "KV cache: eviction and sparse decoding".

    from attnkit.kv import KVSession, get_policy
    s = KVSession(get_policy("snapkv", budget=0.25, obs_window=16))
    out = s.prefill(0, q, k, v)              # [B, T, Hq, D] prompt; the cache is then compressed
    out = s.step(0, q1, k1, v1)              # one decode step
    s.memory()["kept"]                       # bytes of keys + values kept
"""

from .budget import check_budget
from .cache import KVCache
from .paged import PagedLayerCache
from .policies import H2O, POLICIES, EvictionPolicy, Razor, ScoreInputs, SnapKV, Streaming, get_policy
from .razor_heads import head_scores, retrieval_heads
from .session import KVSession
from .sparse import Quest, Reader, Recycled, Routed, Santa

__all__ = [
    "H2O", "POLICIES", "EvictionPolicy", "KVCache", "KVSession", "PagedLayerCache", "Quest", "Razor", "Reader",
    "Recycled", "Routed", "Santa", "ScoreInputs", "SnapKV", "Streaming", "check_budget", "get_policy",
    "head_scores", "retrieval_heads",
]
