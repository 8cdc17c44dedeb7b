"""Planning of the sparse executor's launches: tile shapes and modes per call, the selection-head
mapping, and the tile configurations tried (and timed once per key) by the autotuner."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import config
from .. import interpreted
from ..jit import pow2

@dataclass(frozen=True)
class TilePlan:
    """Tile shapes and modes for one call (see the module docstring)."""

    block_m: int
    block_n: int
    rh: int  # rows per token in a tile: 1 (block mode) or block_m (token mode)
    r: int  # query heads per tile (valid rows per token)
    gather: bool  # keys gathered per selection entry
    num_warps: int
    num_stages: int

    @property
    def tokens(self) -> int:
        return self.block_m // self.rh


def heads_per_tile(hq: int, hkv: int, hsel: int) -> int:
    """Query heads that share both a KV head and a selection row (at most 64 per tile)."""
    if hsel == hq:
        return 1
    g = hq // hkv
    return max(d for d in range(1, min(g, 64) + 1) if g % d == 0)


def hsel_divisor(hq: int, hkv: int, hsel: int) -> int:
    """Query head h reads selection head h // divisor."""
    if hsel == hq:
        return 1
    if hsel == hkv:
        return hq // hkv
    return hq


def plan_query_tiles(hq: int, hkv: int, hsel: int, q_block: int, k_block: int, head_dim: int,
                     backward: bool = False) -> TilePlan:
    gather = k_block < 16
    big = max(head_dim, 16) > 64
    if q_block % 16 == 0:
        options = (64, 32, 16) if backward or big and gather else (128, 64, 32, 16)
        bm = next(m for m in options if q_block % m == 0)
        bn = 32 if (backward and big) else 64
        warps = 8 if bm >= 128 or (backward and big and bm >= 64) else 4
        return TilePlan(bm, bn, 1, 1, gather, warps, 2 if backward else 3)
    r = heads_per_tile(hq, hkv, hsel)
    bm = max(16, pow2(r))
    bn = 32 if (backward and big) else 64
    return TilePlan(bm, bn, bm, r, gather, 4, 2)


# --- a small autotuner: block-mode tiles on CUDA, tried once per key, the fastest cached ------------

_TUNED: dict[tuple, tuple] = {}


def _time_launch(launch, cfg, reps: int = 3) -> float:
    launch(cfg)  # compile + warm
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        launch(cfg)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def pick_config(key: tuple, candidates: list, launch):
    """The fastest candidate config for `key` (timed on first use, then cached); the first
    candidate when tuning is off (CPU interpreter, one candidate). Configs that fail to compile
    (too many resources) are skipped. Every kernel tuned this way writes, never accumulates, its
    outputs, so trial launches leave nothing behind."""
    if key in _TUNED:
        return _TUNED[key]
    if len(candidates) == 1 or interpreted() or not config.get().autotune:
        _TUNED[key] = candidates[0]
        return candidates[0]
    best, best_t = None, float("inf")
    for cfg in candidates:
        try:
            t = _time_launch(launch, cfg)
        except Exception:  # noqa: BLE001 - e.g. triton OutOfResources for a large tile
            continue
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise RuntimeError(f"no tile configuration of {key[0]} could run")
    _TUNED[key] = best
    return best


def tuned_configs() -> dict:
    """What the autotuner picked in this process: {key: (BLOCK_M, BLOCK_N, warps, stages)}."""
    return dict(_TUNED)


def block_candidates(kind: str, q_block: int, k_block: int, big: bool) -> list:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tried for block-mode tiles."""
    if kind == "fwd":
        cands = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)]
    elif kind == "dq":
        cands = [(64, 32, 4, 2), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2)]
    else:  # dkdv: BLOCK_M query rows, BLOCK_N keys
        cands = [(32, 64, 8, 2), (32, 128, 8, 3), (64, 64, 4, 3), (64, 128, 8, 2), (16, 128, 4, 3)]
    if kind in ("fwd", "dq"):
        cands = [c for c in cands if q_block % c[0] == 0]
    return cands
