"""The checks each spawned world runs, and their inputs and float64 oracles (computed in the parent).

One spawned process group per world size runs every case, so the folder stays fast on a 2-core
CI machine; each case is still reported as its own pytest test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from attnkit.core import masks, naive_attention


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # "ring", "ulysses", "hybrid", "bad_shard", "few_heads"
    layout: str = "zigzag"
    causal: bool = True
    window: Union[None, int, list[int]] = None
    sinks: int = 0
    B: int = 1
    T: int = 16
    hq: int = 4
    hkv: int = 2
    d: int = 8
    dtype: torch.dtype = torch.float64
    method: str = "dense"
    options: dict[str, Any] = field(default_factory=dict)
    ulysses_size: int = 1
    seed: int = 0
    gates: tuple[str, ...] = ()  # tensor options [B, T, Hq] passed with option_layout "heads"
    cu_seqlens: Optional[tuple[int, ...]] = None  # packed sequences (global offsets), B == 1

    def cu(self) -> Optional[torch.Tensor]:
        return None if self.cu_seqlens is None else torch.tensor(self.cu_seqlens, dtype=torch.int32)

    def gate_tensors(self) -> dict[str, torch.Tensor]:
        """Global gate tensors `[B, T, Hq]` in (0, 1), same on every process."""
        g = torch.Generator().manual_seed(self.seed + 1)
        return {name: torch.rand(self.B, self.T, self.hq, generator=g, dtype=torch.float64).to(self.dtype)
                for name in self.gates}

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """Global q [B, T, Hq, D], k, v [B, T, Hkv, D] and dout [B, T, Hq, D], same on every process."""
        g = torch.Generator().manual_seed(self.seed)
        shapes = [(self.B, self.T, self.hq, self.d), (self.B, self.T, self.hkv, self.d),
                  (self.B, self.T, self.hkv, self.d), (self.B, self.T, self.hq, self.d)]
        return tuple(torch.randn(s, generator=g, dtype=torch.float64).to(self.dtype) for s in shapes)

    def mask(self) -> Optional[masks.Mask]:
        window = self.options.get("window", self.window)
        sinks = self.options.get("sinks", self.sinks)
        if window is None:
            return None
        m = masks.sliding_window(window)
        return m | masks.sinks(sinks) if sinks else m


def global_selection(case: Case):
    """The whole sequence's selection for a "selection" case: a registered method's own `select`
    (block_topk, moba) or `local` (each query block: its own and the previous key block)."""
    from attnkit.core.selection import KVSelection
    from attnkit.methods import block_topk, moba, nsa

    q, k, _, _ = case.inputs()
    if case.method == "random":  # random blocks, future ones included (causality hides them), q_block != k_block
        qb, kb = case.options["q_block"], case.options["k_block"]
        g = torch.Generator().manual_seed(case.seed + 7)
        chosen = torch.rand(case.B, case.options["hsel"], case.T // qb, case.T // kb, generator=g) < 0.4
        return KVSelection.from_dense_blocks(chosen, qb, kb)
    bs = case.options["block_size"]
    if case.method == "block_topk":
        return block_topk.select(q, k, block_size=bs, topk=case.options["topk"], causal=case.causal)
    if case.method == "moba":
        return moba.select(q, k, block_size=bs, topk=case.options["topk"], causal=case.causal)
    if case.method == "nsa_selected":  # NSA's selected branch: per KV group, by compressed attention
        return nsa.select(q, k, block_size=bs, topk=case.options["topk"], causal=case.causal)
    n = case.T // bs
    own = torch.arange(n).view(1, 1, n, 1)
    rows = torch.cat([own, torch.where(own > 0, own - 1, torch.full_like(own, -1))], -1)
    return KVSelection(rows.expand(case.B, 1, n, 2).to(torch.int32).contiguous(), bs, bs)


def selection_bytes(case: Case, world: int) -> int:
    """Forward bytes the selection-aware exchange must send (all ranks): every key block a rank's
    queries selected from another rank's shard, once."""
    from attnkit.distributed import positions

    sel = global_selection(case)
    local = case.T // world
    owner = torch.empty(case.T, dtype=torch.int64)
    for r in range(world):
        owner[positions(case.layout, world, r, local)] = r
    total = 0
    for r in range(world):
        qpos = positions(case.layout, world, r, local)
        rows = sel.indices[:, :, (qpos // sel.q_block).unique()]
        blocks = rows[rows >= 0].long().unique()
        total += int((owner[blocks * sel.k_block] != r).sum())
    itemsize = torch.empty((), dtype=case.dtype).element_size()
    return total * sel.k_block * case.B * case.hkv * 2 * case.d * itemsize


def reference(case: Case, compute_dtype: Optional[torch.dtype] = torch.float64) -> dict[str, torch.Tensor]:
    """Single-process attention over the whole sequence: output and gradients of q, k, v."""
    q, k, v, do = case.inputs()
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    if case.op == "selection":  # the single-process selection method (or attention under the selection)
        import attnkit

        if case.method in ("local", "nsa_selected", "random"):
            out, _ = naive_attention(q, k, v, causal=case.causal, selection=global_selection(case),
                                     compute_dtype=compute_dtype)
        else:
            out = attnkit.attention(q, k, v, method=case.method, causal=case.causal, backend="reference",
                                    **case.options)
    elif case.gates:  # a method with tensor options: its own single-process definition, in float64
        import attnkit

        assert case.dtype == torch.float64, "gated cases are checked in float64"
        out = attnkit.attention(q, k, v, method=case.method, causal=case.causal, backend="reference",
                                **case.options, **case.gate_tensors())
    else:
        out, _ = naive_attention(q, k, v, causal=case.causal, mask=case.mask(), cu_seqlens=case.cu(),
                                 compute_dtype=compute_dtype)
    out.backward(do.to(out.dtype))
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _ring(name: str, **kw: Any) -> Case:
    return Case(name, "ring", **kw)


CASES: dict[int, list[Case]] = {
    2: [
        _ring("ring_zigzag_causal_gqa", layout="zigzag", causal=True, B=2),
        _ring("ring_zigzag_noncausal", layout="zigzag", causal=False, hkv=4),
        _ring("ring_contiguous_causal_mqa", layout="contiguous", causal=True, hkv=1),
        _ring("ring_contiguous_noncausal_gqa", layout="contiguous", causal=False),
        _ring("ring_zigzag_causal_full", layout="zigzag", causal=True, T=32),
        _ring("ring_zigzag_causal_window", layout="zigzag", causal=True, T=32, window=4),
        _ring("ring_contiguous_causal_window_sinks", layout="contiguous", causal=True, window=5, sinks=2),
        _ring("ring_zigzag_causal_window_sinks", layout="zigzag", causal=True, window=3, sinks=2),
        _ring("ring_zigzag_noncausal_window", layout="zigzag", causal=False, window=4),
        _ring("ring_zigzag_causal_fp32", layout="zigzag", causal=True, dtype=torch.float32),
        _ring("ring_zigzag_causal_perhead_windows_gqa", layout="zigzag", causal=True, T=32, window=[3, 3, 9, 9]),
        _ring("ring_contiguous_causal_perhead_mixed_sinks", layout="contiguous", causal=True, window=[2, 5, 2, 5],
              sinks=1),
        _ring("ring_zigzag_causal_varlen_gqa", layout="zigzag", causal=True, T=32, cu_seqlens=(0, 5, 14, 14, 27, 32)),
        _ring("ring_contiguous_noncausal_varlen", layout="contiguous", causal=False, cu_seqlens=(0, 7, 16)),
        Case("selection_block_topk_zigzag", "selection", layout="zigzag", T=32, method="block_topk",
             options={"block_size": 4, "topk": 2}),
        Case("selection_moba_contiguous", "selection", layout="contiguous", T=32, hkv=4, method="moba",
             options={"block_size": 4, "topk": 2}),
        # q_block != k_block, per-query-head selections that often skip a block's own diagonal block
        Case("selection_random_qb8_kb4_zigzag_gqa", "selection", layout="zigzag", T=32, B=2, method="random",
             options={"q_block": 8, "k_block": 4, "hsel": 4}),
        Case("selection_random_noncausal_contiguous", "selection", layout="contiguous", causal=False, T=32,
             method="random", options={"q_block": 4, "k_block": 8, "hsel": 1}),
        Case("ulysses_dense_causal_gqa", "ulysses", layout="contiguous", causal=True),
        Case("ulysses_dense_noncausal_zigzag", "ulysses", layout="zigzag", causal=False, hkv=4),
        Case("ulysses_sliding_window_mqa", "ulysses", layout="contiguous", causal=True, hkv=1,
             method="sliding_window", options={"window": 3, "sinks": 1}),
        Case("ulysses_nsa_gates_heads_zigzag", "ulysses", layout="zigzag", causal=True, T=32, method="nsa",
             options={"block_size": 4, "topk": 2, "window": 4}, gates=("g_cmp", "g_slc", "g_swa")),
        Case("hybrid_u2_r1_zigzag_causal", "hybrid", layout="zigzag", causal=True, ulysses_size=2),
        Case("bad_shard", "bad_shard", layout="zigzag"),
        Case("few_heads", "few_heads", layout="contiguous", hq=1, hkv=1),
        Case("kv_heads_indivisible", "few_heads", layout="contiguous", hq=6, hkv=3),
        Case("gate_without_layout", "few_heads", layout="contiguous", T=32),
    ],
    4: [
        _ring("ring_zigzag_causal_gqa", layout="zigzag", causal=True),
        _ring("ring_contiguous_noncausal_mqa", layout="contiguous", causal=False, hkv=1),
        _ring("ring_contiguous_causal_full", layout="contiguous", causal=True, T=32),
        _ring("ring_contiguous_causal_window_sinks", layout="contiguous", causal=True, T=32, window=4, sinks=2),
        _ring("ring_zigzag_causal_window_sinks_circulate", layout="zigzag", causal=True, window=3, sinks=3),
        _ring("ring_contiguous_causal_perhead_windows_sinks", layout="contiguous", causal=True, T=32,
              window=[4, 4, 9, 9], sinks=2),
        _ring("ring_zigzag_causal_varlen_window_sinks", layout="zigzag", causal=True, T=32, window=4, sinks=1,
              cu_seqlens=(0, 3, 17, 32)),
        _ring("ring_contiguous_causal_varlen_perhead_windows", layout="contiguous", causal=True, T=32,
              window=[3, 3, 6, 6], cu_seqlens=(0, 9, 32)),
        _ring("ring_contiguous_causal_varlen_one_per_rank", layout="contiguous", causal=True, T=32,
              cu_seqlens=(0, 8, 16, 24, 32)),
        Case("selection_local_contiguous", "selection", layout="contiguous", T=32, method="local",
             options={"block_size": 4}),
        Case("selection_nsa_selected_zigzag_gqa", "selection", layout="zigzag", T=32, method="nsa_selected",
             options={"block_size": 4, "topk": 3}),
        Case("selection_block_topk_contiguous", "selection", layout="contiguous", T=32, method="block_topk",
             options={"block_size": 4, "topk": 3}),
        Case("selection_random_qb4_kb8_contiguous_gqa", "selection", layout="contiguous", T=32, method="random",
             options={"q_block": 4, "k_block": 8, "hsel": 2}),
        Case("selection_random_qb8_kb8_zigzag_mqa", "selection", layout="zigzag", T=64, hkv=1, method="random",
             options={"q_block": 8, "k_block": 8, "hsel": 4}),
        Case("ulysses_dense_causal_zigzag_gqa", "ulysses", layout="zigzag", causal=True),
        Case("ulysses_sliding_window", "ulysses", layout="contiguous", causal=True, hkv=4,
             method="sliding_window", options={"window": 5, "sinks": 2}),
        Case("hybrid_u2_r2_zigzag_causal_mqa", "hybrid", layout="zigzag", causal=True, hkv=1, ulysses_size=2),
        Case("hybrid_u2_r2_zigzag_causal_perhead_windows_varlen", "hybrid", layout="zigzag", causal=True, T=32,
             window=[3, 3, 7, 7], ulysses_size=2, cu_seqlens=(0, 11, 32)),
        Case("hybrid_u2_r2_contiguous_noncausal_window", "hybrid", layout="contiguous", causal=False, window=3,
             sinks=1, ulysses_size=2),
        Case("bad_shard", "bad_shard", layout="contiguous"),
        Case("few_heads", "few_heads", layout="contiguous", hq=2, hkv=1),
        Case("heads_indivisible", "few_heads", layout="contiguous", hq=6, hkv=2),
        Case("ulysses_nsa_gates_heads", "ulysses", layout="contiguous", causal=True, T=32, hkv=4, method="nsa",
             options={"block_size": 4, "topk": 2}, gates=("g_cmp", "g_slc")),
    ],
}

# Window-aware ring vs the full ring on the same shapes, with the forward bytes (summed over ranks)
# each must send. A shard's K and V: B * T/W * Hkv * D * 8 bytes each (float64).
#  W=2 zigzag, T=32: shard 4096 B. Full causal: rank 0 sends chunk 0 (rank 1 never sees chunk 3),
#    rank 1 sends both chunks: 1.5 shards. Window 4: each rank needs one neighbouring chunk: 1 shard.
#  W=4 contiguous, T=32: shard 2048 B. Full causal: shard r travels W-1-r hops: 3+2+1 = 6 shards.
#    Window 4 reaches only the previous shard: 3 hops, plus the 2 sink tokens broadcast to 3 ranks
#    (3 * 2 tokens * Hkv 2 * D 8 * 8 B * 2 = 1536 B).
BYTES_PAIRS = {
    2: dict(windowed="ring_zigzag_causal_window", full="ring_zigzag_causal_full", windowed_steps=2, full_steps=2,
            windowed_bytes=4096, full_bytes=6144),
    4: dict(windowed="ring_contiguous_causal_window_sinks", full="ring_contiguous_causal_full", windowed_steps=2,
            full_steps=4, windowed_bytes=3 * 2048 + 1536, full_bytes=6 * 2048),
}
