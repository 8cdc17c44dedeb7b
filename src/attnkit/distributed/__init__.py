"""Context parallelism over torch.distributed: ring attention, Ulysses, and the two combined.

    from attnkit.distributed import ring_attention, ulysses_attention, hybrid_attention, shard
    q_local = shard(q, world, rank, layout="zigzag")          # [B, T / W, Hq, D]
    o_local = ring_attention(q_local, k_local, v_local, causal=True, layout="zigzag")

Every function runs on the ranks of a process group (NCCL on GPUs, gloo on CPUs), forward and
backward; see docs/distributed.md and examples/torchrun_ring.py.
"""

from .comm import CommStats
from .layout import LAYOUTS, Segment, gather, positions, segments, shard, unshard
from .hybrid import HybridGroups, hybrid_attention, hybrid_groups, hybrid_shard, hybrid_unshard
from .ring import RingExplanation, explain_ring, ring_attention
from .selection_ring import (SelectionRingExplanation, explain_selection_ring, selection_ring_attention,
                             shard_selection)
from .ulysses import ulysses_attention

__all__ = [
    "LAYOUTS", "CommStats", "RingExplanation", "explain_ring", "HybridGroups", "Segment", "gather", "hybrid_attention", "hybrid_groups", "hybrid_shard",
    "hybrid_unshard", "positions", "ring_attention", "segments", "selection_ring_attention", "shard_selection",
    "SelectionRingExplanation", "explain_selection_ring", "shard", "ulysses_attention", "unshard",
]
