"""The router's shared stages for content-routed selections (MoBA, NSA, DSA, block top-k, power, stochastic).

- `SeqView`: the inputs seen per sequence. Varlen inputs (`cu_seqlens`, B == 1) are unpacked into
  a padded batch `[N, L, ...]` so one vectorised policy serves both layouts; block ids are then
  local to each sequence, as `KVSelection` requires under varlen.
- `block_mean`: mean over the existing keys (or queries) of each block, padding excluded.
- `compact_rows`: sort selection rows ascending, -1 padding last, and trim the width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.contract import AttentionCall
from ..core.selection import cdiv
from ..core import topk as _topk
from .gemm import compute_dtype


class Packing:
    """Maps packed varlen tensors `[1, T, ...]` to a padded batch `[N, L, ...]` and back."""

    def __init__(self, cu_seqlens: torch.Tensor, device: torch.device) -> None:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        self.lengths = cu[1:] - cu[:-1]  # [N]
        self.total = int(cu[-1])
        self.max_len = max(1, int(self.lengths.max()))
        pos = torch.arange(self.max_len, device=device)
        self.valid = pos.unsqueeze(0) < self.lengths.unsqueeze(1)  # [N, L]
        self.index = (cu[:-1].unsqueeze(1) + pos).clamp_max(max(self.total - 1, 0))  # [N, L]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """`[1, T, ...]` -> `[N, L, ...]`, zeros past each sequence's end (differentiable)."""
        out = x[0][self.index]
        keep = self.valid.view(*self.valid.shape, *([1] * (out.dim() - 2)))
        return torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """`[N, L, ...]` -> `[1, T, ...]` (differentiable)."""
        return y[self.valid].unsqueeze(0)


@dataclass(frozen=True)
class SeqView:
    """Per-sequence inputs of a selection policy.

    `q: [N, Tq, Hq, D]`, `k: [N, Tk, Hkv, D]`; query row i sits at key position `i + offset`
    (bottom-right alignment; 0 under varlen); `k_len: [N]` int64 valid keys per sequence (Tk
    without varlen). Rows and keys past a sequence's end are padding.
    """

    q: torch.Tensor
    k: torch.Tensor
    offset: int
    k_len: torch.Tensor
    causal: bool
    packing: Optional[Packing]

    @property
    def tq(self) -> int:
        return self.q.shape[1]

    @property
    def tk(self) -> int:
        return self.k.shape[1]

    def q_pos(self) -> torch.Tensor:
        """Aligned query positions `[Tq]` int64."""
        return torch.arange(self.tq, device=self.q.device) + self.offset

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Bring a per-token tensor `[B, T, ...]` (an indexer input, a gate) into the view's layout."""
        return x if self.packing is None else self.packing.pad(x)


def seq_view(call: AttentionCall) -> SeqView:
    """Detached per-sequence view of a validated call (selection never carries gradients)."""
    q, k = call.q.detach(), call.k.detach()
    if call.cu_seqlens is None:
        k_len = torch.full((call.batch,), call.tk, dtype=torch.int64, device=q.device)
        return SeqView(q, k, call.tk - call.tq, k_len, call.causal, None)
    packing = Packing(call.cu_seqlens, q.device)
    return SeqView(packing.pad(q), packing.pad(k), 0, packing.lengths, call.causal, packing)


def block_mean(x: torch.Tensor, block: int, lengths: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Mean over the existing rows of each block: `x [N, T, H, D]`, `lengths [N]` -> `[N, ceil(T/block), H, D]`.

    Rows at or past `lengths[n]` are excluded; a block with no row gives 0. Differentiable."""
    N, T, H, D = x.shape
    nb = cdiv(T, block)
    x = x.to(dtype or compute_dtype(x.dtype))
    valid = torch.arange(nb * block, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)  # [N, nb*block]
    pad = torch.zeros(N, nb * block - T, H, D, dtype=x.dtype, device=x.device)
    xs = torch.where(valid.view(N, -1, 1, 1), torch.cat([x, pad], 1), torch.zeros((), dtype=x.dtype, device=x.device))
    sums = xs.view(N, nb, block, H, D).sum(2)
    counts = valid.view(N, nb, block).sum(-1).clamp_min(1).to(x.dtype)  # [N, nb]
    return sums / counts.view(N, nb, 1, 1)


def compact_rows(idx: torch.Tensor, max_width: int, rows_per_chunk: Optional[int] = None) -> torch.Tensor:
    """Sort each row ascending with -1 padding last; keep at most `max(1, max_width)` columns.

    `idx: [..., R, S]` rows must be free of duplicates among valid (>= 0) ids. Returns int32,
    contiguous; works in chunks of rows so long selections (DSA at T = 64K) stay O(T * S): 16K rows
    on the CPU, as many as `core.topk.tile_budget` allows on an accelerator (one chunk up to 64K)."""
    width = max(1, min(max_width, idx.shape[-1]))
    if rows_per_chunk is None:
        rows_per_chunk = 1 << 14
        if _topk.on_accelerator(idx.device):
            per_row = max(1, math.prod(idx.shape[:-2]) * idx.shape[-1])
            rows_per_chunk = max(rows_per_chunk, _topk.tile_budget(idx.device) // per_row)
    out = torch.empty(*idx.shape[:-1], width, dtype=torch.int32, device=idx.device)
    big = torch.iinfo(torch.int32).max
    for r0 in range(0, idx.shape[-2], rows_per_chunk):
        part = idx[..., r0 : r0 + rows_per_chunk, :].to(torch.int32)
        key = part.masked_fill(part < 0, big).sort(dim=-1).values[..., :width]
        out[..., r0 : r0 + rows_per_chunk, :] = key.masked_fill(key == big, -1)
    return out


def num_blocks(view: SeqView, block: int) -> int:
    return cdiv(view.tk, block)


# --- the fused routing kernels ------------------------------------------------------------------
# MoBA (per query head, gate `q . mean(k in block)`) and NSA (per KV group, compressed-attention
# probability summed over the group's heads) share the candidate / forced conventions and one
# on-chip running top-k (`kernels/selection/routed_topk.py`); DSA's top-k can run as a radix select
# (`kernels/selection/radix_topk.py`). The PyTorch tiles (`core.topk.streaming_topk`) stay the
# reference path. Where each may run: `config` `routed_topk_devices` and `radix_topk_devices`.


def routed_kernel(device: torch.device, dtype: torch.dtype, width: int) -> Optional[Any]:
    """The fused routing kernel module when it can serve a selection of `width` blocks per row on
    `device` in `dtype`, else None (the PyTorch tiles: float64, other devices, more than `MAX_TOPK`)."""
    from .. import config, kernels

    if dtype == torch.float64:
        return None
    mod = kernels.module_for("selection.routed_topk", device, config.get().routed_topk_devices)
    return mod if mod is not None and width <= mod.MAX_TOPK else None


def radix_kernel(device: torch.device, dtype: torch.dtype) -> Optional[Any]:
    """The radix-select module when it may take `dtype` score tiles on `device` (float32 only; by
    default nowhere: measured slower than `torch.topk` for DSA, see docs/executors.md), else None."""
    from .. import config, kernels

    if dtype != torch.float32:
        return None
    return kernels.module_for("selection.radix_topk", device, config.get().radix_topk_devices)


def kernel_variant(name: str, call: AttentionCall, devices: tuple[str, ...], ok_text: str) -> tuple[str, bool, str]:
    """One `explain()` row for a routing kernel (what `routed_kernel` / `radix_kernel` decide,
    without loading the kernels)."""
    from .. import kernels

    if call.dtype == torch.float64:
        return (name, False, "no float64")
    if call.device.type not in devices:
        return (name, False, f"runs on {'/'.join(devices) or 'no device'}, inputs are on {call.device.type}")
    reason = kernels.device_ok(call.device.type)
    return (name, False, reason) if reason else (name, True, ok_text)
